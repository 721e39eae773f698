"""Benchmarks of HySparK pre-training inside nnU-Net: cross-validation folds and their summary.

* :mod:`.folds` plans and runs ``nnUNetv2_train`` for every arm x fold (resumable),
* :mod:`.splits` validates and installs custom cross-validation splits,
* :mod:`.summary` turns nnU-Net's validation summaries into tables, paired tests and a plot.

Submodules are not imported here so that ``hyspark_benchmark --help`` stays fast.
"""

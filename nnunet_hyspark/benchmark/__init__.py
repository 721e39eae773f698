"""Benchmarks of pre-training inside nnU-Net: cross-validation folds, their summary, and backend speed.

* :mod:`.folds` runs a benchmark (``nnUNetv2_train`` for every arm x fold, resumable) and writes its summary,
  built from :mod:`.arms` (arm specs), :mod:`.spec` (what a benchmark is; input checks), :mod:`.manifest`
  (the state file) and :mod:`.running` (fold states, commands, running them);
* :mod:`.splits` validates and installs custom cross-validation splits;
* :mod:`.summary` reads nnU-Net's validation summaries and computes paired tests; :mod:`.summary_tables`
  writes the tables and the plot;
* :mod:`.test_set` ensembles each arm's folds on held-out test images (``--test-images``) and scores them with
  nnU-Net's evaluation, :mod:`.test_set_tables` tabulates them; :mod:`.cost` reads parameters, training and
  pre-training wall time;
* :mod:`.speed` times the sparse backends.

Submodules are not imported here so that ``hyspark_benchmark --help`` stays fast.
"""

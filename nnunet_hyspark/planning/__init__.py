"""Planning and preprocessing with nnU-Net for a method's network (``hyspark_plan_and_preprocess``).

* :mod:`.run` the options, the two steps (check every input, then plan and preprocess each dataset),
  and the planner lookup through the method registry;
* :mod:`.raw_checks` checks of the raw data before anything is written;
* :mod:`.nnunet_steps` nnU-Net's fingerprint, plans transfer and unlabeled preprocessing;
* :mod:`.rollback` putting a preprocessed folder back as it was when a run fails.

Submodules are not imported here: the methods registry (and torch) load only when planning runs.
"""

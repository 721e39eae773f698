"""The folder that ``nnUNet_extTrainer`` points to (see ``hyspark_env``).

nnU-Net imports every module in that folder as a *top-level* module. Defining
trainer classes here would give them a second identity beside
``nnunet_hyspark.trainers.*``; so this folder only re-exports the package's classes.
"""

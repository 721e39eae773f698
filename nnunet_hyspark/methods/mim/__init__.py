"""MiM (Mask in Mask): hierarchical masked image modelling on three levels of one crop (``docs/methods.md``).

``levels.py`` the level geometry and one step's sampling, ``backbone.py`` the ConvMAE-style
backbone, ``model.py`` the pre-training model, ``network.py`` the fine-tuning MiMUNet,
``weights.py`` its weights files, ``published.py`` the published checkpoints (conversion to a
MiMUNet file, loading into the pre-training model), ``memory.py`` the planner's memory estimate.
:data:`SPEC` is what the rest of the package reads.
"""
from __future__ import annotations

from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.methods.mim import memory, model, published, weights
from nnunet_hyspark.methods.mim.levels import CROP_SCALE, LEVEL_MULTIPLE
from nnunet_hyspark.methods.spec import MethodSpec

SPEC = MethodSpec(
    "mim", "MiM",
    citation="Zhuang J., Wu L., Wang Q., et al. MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical "
             "Image Analysis. IEEE Transactions on Medical Imaging, 2025.",
    build_model=model.build_model, validation_loss=model.validation_loss, preview=model.preview,
    export=weights.export, network=weights.NETWORK, estimate_memory=memory.estimate_training_memory,
    convert_published=published.convert_published, recognise_published=published.recognise_published,
    load_published_pretraining=published.load_published_pretraining,
    encoder_features=model.encoder_features,  # unmasked: [x1 .. x4] at strides 2 .. 16
    planner="nnunet_hyspark.planners.mim_planner.MiMPlanner", plans_name="nnUNetMiMPlans",
    finetune_trainer="nnUNetTrainerMiMFinetune",
    # 32: MiMUNet's fifth stage reaches 1/32, and the coarse mask halves the 1/16 token grid;
    # the loader reads crops of twice the patch, from which MiM cuts its three levels
    patch_multiple=LEVEL_MULTIPLE, crop_scale=CROP_SCALE,
    # published: one uniformly random crop (2x the level patch) per sample, no flips or other augmentation
    data_recipe=DataRecipe(crops_per_volume=1, sampler="uniform", flip_probs=(0.0, 0.0, 0.0)),
    recipe=model.RECIPE, recipe_note="mask ratios 0.5 / 0.6 / 0.5 per level, crops of 2x the patch",
)

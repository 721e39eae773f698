"""Hi-End-MAE: a plain-ViT masked autoencoder whose decoder queries several encoder depths (``docs/methods.md``).

``encoder.py`` the ViT, ``model.py`` the pre-training model, ``network.py`` the fine-tuning
HiEndUNETR, ``weights.py`` its weights files, ``published.py`` the published checkpoints
(conversion for fine-tuning, loading for pre-training), ``memory.py`` the planner's memory estimate.
:data:`SPEC` is what the rest of the package reads.
"""
from __future__ import annotations

from nnunet_hyspark.mae import masked_preview, masked_validation_loss
from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.methods.hiend_mae import memory, model, published, weights
from nnunet_hyspark.methods.spec import MethodSpec

SPEC = MethodSpec(
    "hiend_mae", "Hi-End-MAE",
    citation="Tang F., Yao Q., Ma W., et al. Hi-End-MAE: Hierarchical Encoder-Driven Masked Autoencoders Are "
             "Stronger Vision Learners for Medical Image Segmentation. Medical Image Analysis, 2025.",
    planner="nnunet_hyspark.planners.hiend_mae_planner.HiEndMAEPlanner", plans_name="nnUNetHiEndMAEPlans",
    finetune_trainer="nnUNetTrainerHiEndMAEFinetune", recipe=model.RECIPE,
    # published: 8 crops per volume, foreground:background 6:2, flips p 0.5 per axis, rot90 p 0.3,
    # intensity scale and shift p 0.1 each (+-0.1)
    data_recipe=DataRecipe(crops_per_volume=8, sampler="fg_bg", fg_bg_ratio=(6, 2), flip_probs=(0.5, 0.5, 0.5),
                           rot90_probability=0.3, intensity_probability=0.1, intensity_range=0.1),
    # the multiple is the plan's ViT patch (12 or 16): the loader accepts any patch, build_model checks it
    patch_multiple=1,
    # like HySparK's, the model has the masked-autoencoder interface (random_mask, forward(x, mask), reconstruct)
    build_model=model.build_model, validation_loss=masked_validation_loss, preview=masked_preview,
    network=weights.NETWORK, export=weights.export, estimate_memory=memory.estimate_training_memory,
    convert_published=published.convert_published, recognise_published=published.recognise_published,
    load_published_pretraining=published.load_published_pretraining,
    encoder_features=model.encoder_features,
)

"""HySparK: hybrid sparse masking of a CNN/ViT encoder (``docs/methods.md``).

``encoder.py`` the hybrid encoder, ``network.py`` its fine-tuning U-Net, ``model.py`` the
pre-training model, ``weights.py`` export / channel adaptation / the published checkpoint,
``memory.py`` the planner's memory estimate. :data:`SPEC` is what the rest of the package reads.
"""
from __future__ import annotations

from nnunet_hyspark.mae import masked_preview, masked_validation_loss
from nnunet_hyspark.masking import ENCODER_STRIDE
from nnunet_hyspark.methods.data_recipe import DataRecipe
from nnunet_hyspark.methods.hyspark import memory, model, weights
from nnunet_hyspark.methods.spec import MethodSpec

SPEC = MethodSpec(
    "hyspark", "HySparK",
    citation="Tang F., Xu R., Yao Q., et al. HySparK: Hybrid Sparse Masking for Large Scale Medical Image "
             "Pre-Training. MICCAI 2024.",
    # the masked-autoencoder interface (random_mask, forward(x, mask), reconstruct) gives validation and previews
    build_model=model.build_model, validation_loss=masked_validation_loss, preview=masked_preview,
    export=weights.export, network=weights.NETWORK, estimate_memory=memory.estimate_for_plan,
    convert_published=weights.convert_published,
    recognise_published=lambda sd: weights.PUBLISHED_STEM_KEY in sd,  # embeddings.* / mae.* keys
    encoder_features=lambda m, x: m.encoder(x),  # unmasked: [x1 .. x5] at strides 1 .. 16
    planner="nnunet_hyspark.planners.hyspark_planner.HySparKPlanner", plans_name="nnUNetHySparKPlans",
    finetune_trainer="nnUNetTrainerHySparKFinetune",
    patch_multiple=ENCODER_STRIDE,  # 16: the hybrid encoder downsamples by 16 before the ViT
    recipe={},  # the pre-training loop's defaults are HySparK's reference recipe
    data_recipe=DataRecipe(),  # published: 4 body-biased crops per volume, flips p 0.2 / 0.2 / 0.1
)

"""nnU-Net experiment planners of nnunet-hyspark (installed as ``nnunet_hyspark.planners``).

nnU-Net's ``-pl`` flag only searches inside nnunetv2, so these planners are used
through ``hyspark_plan_and_preprocess``, which instantiates them directly.
"""
from nnunet_hyspark.planners.hyspark_planner import ARCH_PRESETS, PLANS_NAME, HySparKPlanner

__all__ = ["ARCH_PRESETS", "PLANS_NAME", "HySparKPlanner"]

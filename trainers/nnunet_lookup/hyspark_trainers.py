"""Re-exports every nnunet-hyspark trainer for nnU-Net's trainer lookup (absolute imports only)."""
from nnunet_hyspark.trainers.nnUNetTrainerHySparK import *  # noqa: F401,F403
from nnunet_hyspark.trainers.nnUNetTrainerHySparKFinetune import *  # noqa: F401,F403,E402
from nnunet_hyspark.trainers.nnUNetTrainerMiMFinetune import *  # noqa: F401,F403,E402
from nnunet_hyspark.trainers.nnUNetTrainerHiEndMAEFinetune import *  # noqa: F401,F403,E402
from nnunet_hyspark.trainers.nnUNetTrainerFinetunePaper import *  # noqa: F401,F403,E402
from nnunet_hyspark.trainers.nnUNetTrainerStudy import *  # noqa: F401,F403,E402

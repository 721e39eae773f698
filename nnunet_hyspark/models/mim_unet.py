# Plans and weights files written by earlier versions name this dotted path; the network lives in methods/.
from nnunet_hyspark.methods.mim.network import MiMUNet  # noqa: F401

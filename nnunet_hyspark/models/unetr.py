# Plans and weights files written by earlier versions name this dotted path; the network lives in methods/.
from nnunet_hyspark.methods.hiend_mae.network import HiEndUNETR  # noqa: F401

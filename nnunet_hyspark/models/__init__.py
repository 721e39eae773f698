"""Legacy dotted paths of the fine-tuning networks (plans and weights of earlier versions name them);
the networks live in :mod:`nnunet_hyspark.methods`."""

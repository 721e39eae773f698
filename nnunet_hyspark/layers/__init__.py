"""Building blocks shared by the methods' networks (convolution / transformer blocks, position embeddings)."""

"""causeseg: CAUSE (Causal Unsupervised Semantic Segmentation), label-free and fast."""

__version__ = "0.1.0"

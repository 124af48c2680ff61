"""Tree-CRF message passing: the PyTorch reference (any device) and, on CUDA, the Triton kernel.
Knows nothing of models or COCO."""

from .tree_crf import tree_crf_map, tree_crf_marginals, tree_depths

__all__ = ["tree_crf_map", "tree_crf_marginals", "tree_depths"]

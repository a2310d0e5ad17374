"""Pixel-to-segment primitives: each module holds one op's autograd wrapper,
PyTorch path and dispatch; the Triton kernels live in spml_fast.triton_kernels."""
from .nearest_prototype import nearest_prototype
from .pixel_segment_loss import pixel_segment_loss
from .segment_prototypes import segment_prototypes
from .spherical_kmeans import grid_assignment, spherical_kmeans
from .tiling import TileConfig

__all__ = ["pixel_segment_loss", "segment_prototypes", "nearest_prototype", "spherical_kmeans",
           "grid_assignment", "TileConfig"]

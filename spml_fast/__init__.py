"""spml_fast: weakly supervised semantic segmentation by pixel-to-segment
contrastive learning (SPML), with tiled Triton kernels."""
from .ops import (TileConfig, grid_assignment, nearest_prototype, pixel_segment_loss, segment_prototypes,
                  spherical_kmeans)

__version__ = "0.1.0"
__all__ = ["pixel_segment_loss", "segment_prototypes", "nearest_prototype", "spherical_kmeans",
           "grid_assignment", "TileConfig", "__version__"]

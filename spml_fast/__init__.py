"""spml_fast: weakly supervised semantic segmentation by pixel-to-segment
contrastive learning (SPML), with tiled Triton kernels."""
from .ops import (TileConfig, grid_assignment, nearest_prototype, pixel_segment_loss, segment_prototypes,
                  spherical_kmeans)

__version__ = "0.1.0"

# The deployment and inference classes, imported on first use (``import spml_fast`` stays light).
_LAZY = {"Segmenter": "runtime", "ProviderFallbackError": "runtime", "PrototypeBank": "bank",
         "load_bank": "bank", "PredictorConfig": "inference", "predict_labels": "inference",
         "predict_scores": "inference", "Run": "run", "CrfConfig": "crf"}

__all__ = ["pixel_segment_loss", "segment_prototypes", "nearest_prototype", "spherical_kmeans",
           "grid_assignment", "TileConfig", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'spml_fast' has no attribute {name!r}")

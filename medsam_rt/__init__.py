"""medsam-rt: a torch-free ONNX Runtime runtime for MedSAM.

>>> from medsam_rt import MedSAM
>>> model = MedSAM.load("models/medsam", device="cpu")
>>> emb = model.embed("scan.png")
>>> res = model.segment(emb, [[30, 40, 120, 160]])
>>> res.masks.shape  # (N, H, W) bool
"""

from .errors import (
    EmbeddingMismatchError,
    ExportError,
    InvalidBoxError,
    InvalidImageError,
    MedSAMError,
    ModelDirError,
    ParityError,
    PrecisionCheckError,
    ProviderUnavailableError,
)
from .model import ImageEmbedding, MedSAM, Segmentation

__version__ = "0.1.0"

__all__ = [
    "EmbeddingMismatchError",
    "ExportError",
    "ImageEmbedding",
    "InvalidBoxError",
    "InvalidImageError",
    "MedSAM",
    "MedSAMError",
    "ModelDirError",
    "ParityError",
    "PrecisionCheckError",
    "ProviderUnavailableError",
    "Segmentation",
    "__version__",
]

"""medsam-rt: a torch-free ONNX Runtime runtime for MedSAM.

>>> from medsam_rt import MedSAM
>>> model = MedSAM.load("models/medsam", device="cpu")
>>> emb = model.embed("scan.png")
>>> res = model.segment(emb, [[30, 40, 120, 160]])
>>> res.masks.shape  # (N, H, W) bool
"""

from .errors import (
    ChallengeError,
    DemoError,
    EmbeddingMismatchError,
    ExportError,
    GateError,
    InvalidBoxError,
    InvalidImageError,
    InvalidSliceError,
    InvalidWindowError,
    LabelOverflowError,
    LabelVolumeError,
    MaskFormatError,
    MedSAMError,
    MetricsError,
    ModelDirError,
    OptionSetError,
    OutputFormatError,
    ParityError,
    PrecisionCheckError,
    ProviderUnavailableError,
    SeriesError,
    UsageError,
)
from .model import ImageEmbedding, MedSAM, Segmentation

__version__ = "0.1.0"

__all__ = [
    "ChallengeError",
    "DemoError",
    "EmbeddingMismatchError",
    "ExportError",
    "GateError",
    "ImageEmbedding",
    "InvalidBoxError",
    "InvalidImageError",
    "InvalidSliceError",
    "InvalidWindowError",
    "LabelOverflowError",
    "LabelVolumeError",
    "MaskFormatError",
    "MedSAM",
    "MedSAMError",
    "MetricsError",
    "ModelDirError",
    "OptionSetError",
    "OutputFormatError",
    "ParityError",
    "PrecisionCheckError",
    "ProviderUnavailableError",
    "Segmentation",
    "SeriesError",
    "UsageError",
    "__version__",
]

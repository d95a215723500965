"""medsam-rt: a torch-free ONNX Runtime runtime for MedSAM.

>>> from medsam_rt import MedSAM
>>> model = MedSAM.load("models/medsam", device="cpu")
>>> emb = model.embed("scan.png")
>>> res = model.segment(emb, [[30, 40, 120, 160]])
>>> res.masks.shape  # (N, H, W) bool
"""

from medsam_rt import errors
from medsam_rt.core.model import ImageEmbedding, MedSAM, Segmentation
from medsam_rt.errors import *  # noqa: F403  (every typed error: errors.__all__)

__version__ = "0.1.0"

__all__ = [*errors.__all__, "ImageEmbedding", "MedSAM", "Segmentation", "__version__"]

"""Low-resolution logits -> masks at the original resolution, in numpy.

Bilinear resizing (``align_corners=False``, no antialiasing, as
``torch.nn.functional.interpolate``) is linear and separable, so each resize is
a small ``(out, in)`` matrix per axis. A whole chain such as "upscale to the
padded input, crop the unpadded region, resize to the original size" collapses
into one matrix per axis, applied as ``rows @ logits @ cols.T``: exact, and far
cheaper than materialising the intermediate 1024x1024 logits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import ModelDirError
from .preprocess import Preprocessing
from .resample import bilinear_matrix


@lru_cache(maxsize=64)
def _axis_matrix(mode: str, low_res: int, padded: int, resized: int, original: int) -> np.ndarray:
    """float32 ``(original, low_res)``: the whole postprocessing chain along one axis."""
    if mode == "upscale_crop_resize":  # low-res -> padded input, keep [:resized], -> original
        chain = bilinear_matrix(original, resized) @ bilinear_matrix(padded, low_res)[:resized]
    elif mode == "crop_resize":  # keep [:resized] of the low-res logits (low_res == padded), -> original
        if low_res != padded:
            raise ModelDirError(f"postprocess 'crop_resize' needs low-res logits at the input size {padded}")
        chain = np.zeros((original, low_res))
        chain[:, :resized] = bilinear_matrix(original, resized)
    else:  # "resize": low-res -> original (square resize, no padding)
        chain = bilinear_matrix(original, low_res)
    m = chain.astype(np.float32)
    m.setflags(write=False)
    return m


def upscale_logits(
    low_res_logits: np.ndarray,
    p: Preprocessing,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
) -> np.ndarray:
    """Map decoder logits to the original image.

    Args:
        low_res_logits: float32 ``(N, h_lr, w_lr)`` (256x256 for SAM decoders).
        p: the model's preprocessing recipe (its ``pad_size`` is the encoder frame).
        resized_size: ``(h, w)`` of the resized image inside the padded input.
        original_size: ``(H, W)`` of the original image.

    Returns:
        float32 ``(N, H, W)`` logits in original pixel coordinates.
    """
    n, lh, lw = low_res_logits.shape
    rows = _axis_matrix(p.postprocess, lh, p.pad_size[0], resized_size[0], original_size[0])
    cols = _axis_matrix(p.postprocess, lw, p.pad_size[1], resized_size[1], original_size[1])
    return np.matmul(np.matmul(rows, low_res_logits.astype(np.float32, copy=False)), cols.T)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable float32 logistic function."""
    out = np.empty_like(x, dtype=np.float32)
    np.negative(x, out=out)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0 gives exactly 0
        np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out

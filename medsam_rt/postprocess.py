"""Low-resolution logits -> masks at the original resolution, in numpy.

Bilinear resizing (``align_corners=False``, no antialiasing, as
``torch.nn.functional.interpolate``) is linear and separable, so each resize is
a small ``(out, in)`` matrix per axis. The whole chain "upscale to the padded
input, crop the unpadded region, resize to the original size" collapses into
one matrix per axis, applied as ``rows @ logits @ cols.T``: exact, and far
cheaper than materialising the intermediate 1024x1024 logits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .preprocess import Preprocessing


@lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float64 matrix of 1-D bilinear resizing, half-pixel centres."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def _axis_matrix(low_res: int, padded: int, resized: int, original: int) -> np.ndarray:
    """float32 ``(original, low_res)``: upscale to ``padded``, keep ``[:resized]``, resize to ``original``."""
    up = bilinear_matrix(padded, low_res)[:resized]
    m = (bilinear_matrix(original, resized) @ up).astype(np.float32)
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
    rows = _axis_matrix(lh, p.pad_size[0], resized_size[0], original_size[0])
    cols = _axis_matrix(lw, p.pad_size[1], resized_size[1], original_size[1])
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

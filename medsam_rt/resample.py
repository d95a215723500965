"""Separable resampling as small matrices, in numpy.

Every resize here is linear and separable: one ``(out, in)`` matrix per axis,
applied as ``rows @ image @ cols.T``. Two families:

- :func:`bilinear_matrix`: ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)`` without antialiasing (mask postprocessing);
- :func:`area_matrix`: OpenCV's ``INTER_AREA`` (LiteMedSAM's preprocessing):
  exact pixel-area averaging when shrinking, OpenCV's "area" linear weights
  when enlarging.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _frozen(m: np.ndarray) -> np.ndarray:
    m.setflags(write=False)
    return m


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
    return _frozen(m)


@lru_cache(maxsize=64)
def _area_shrink(out_size: int, in_size: int) -> np.ndarray:
    """Each output pixel averages the input interval it covers, partial pixels weighted by coverage."""
    scale = in_size / out_size
    m = np.zeros((out_size, in_size))
    for d in range(out_size):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, in_size - f1)
        s2 = min(math.floor(f2), in_size - 1)
        s1 = min(math.ceil(f1), s2)
        if s1 - f1 > 1e-3:
            m[d, s1 - 1] += (s1 - f1) / cell
        m[d, s1:s2] += 1.0 / cell
        if f2 - s2 > 1e-3:
            m[d, s2] += min(min(f2 - s2, 1.0), cell) / cell
    return _frozen(m)


@lru_cache(maxsize=64)
def _area_linear(out_size: int, in_size: int) -> np.ndarray:
    """OpenCV's INTER_AREA weights when enlarging: linear, with its sharpened 'area' fractions."""
    scale, inv = in_size / out_size, out_size / in_size
    m = np.zeros((out_size, in_size))
    for d in range(out_size):
        s = math.floor(d * scale)
        f = (d + 1) - (s + 1) * inv
        f = 0.0 if f <= 0 else f - math.floor(f)
        if s >= in_size - 1:
            s, f = in_size - 1, 0.0
        m[d, s] += 1.0 - f
        if f:
            m[d, s + 1] += f
    return _frozen(m)


def area_matrices(out_hw: tuple[int, int], in_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices of ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` from ``in_hw`` to ``out_hw``.

    OpenCV averages areas only when neither axis is enlarged; otherwise both axes use its linear "area" weights.
    """
    (oh, ow), (ih, iw) = out_hw, in_hw
    shrink = ih >= oh and iw >= ow
    make = _area_shrink if shrink else _area_linear
    return make(oh, ih), make(ow, iw)


def apply_separable(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, block_bytes: int = 64 << 20) -> np.ndarray:
    """``rows @ image[..., c] @ cols.T`` for each channel of an ``(H, W, C)`` (or one ``(H, W)``) image; float64
    ``(out_h, out_w, C)`` (or ``(out_h, out_w)``) result.

    The smaller product comes first. Memory: the input is converted to float64 in strips of at most
    ``block_bytes`` along the axis that product keeps (columns for ``rows @ plane``, rows for ``plane @ cols.T``),
    so no full-size float copy is made; each output value is the same dot product over the same inputs in
    the same order as the whole-plane product (strips split only the kept axis, never the summed one).
    """
    if image.ndim == 3:
        out = np.empty((rows.shape[0], cols.shape[0], image.shape[2]))
        for ch in range(image.shape[2]):
            out[:, :, ch] = apply_separable(image[:, :, ch], rows, cols, block_bytes)
        return out
    h, w = image.shape
    if rows.shape[0] <= cols.shape[0]:  # (rows @ plane) @ cols.T, plane in column strips
        step = max(1, block_bytes // (8 * h))
        first = np.empty((rows.shape[0], w))
        for c in range(0, w, step):
            first[:, c : c + step] = rows @ image[:, c : c + step].astype(np.float64)
        return first @ cols.T
    step = max(1, block_bytes // (8 * w))  # rows @ (plane @ cols.T), plane in row strips
    first = np.empty((h, cols.shape[0]))
    for r in range(0, h, step):
        first[r : r + step] = image[r : r + step].astype(np.float64) @ cols.T
    return rows @ first

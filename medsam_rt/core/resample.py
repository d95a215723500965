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


#: float64 temporaries of the banded products here and of preprocessing's row-block loops are at most this large
#: (bytes).
BLOCK_BYTES = 64 << 20


def apply_separable(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, block_bytes: int = BLOCK_BYTES
) -> np.ndarray:
    """``rows @ image @ cols.T`` for one ``(H, W)`` plane (callers loop over channels); float64 ``(out_h, out_w)``.

    The smaller product comes first. An image whose float64 plane fits in ``block_bytes`` is multiplied whole (one
    BLAS call per product). A larger one is never converted whole: the first product runs in bands, each a group
    of output rows (columns) with the input rows (columns) its weights reach, converted to float64 at most
    ``block_bytes`` at a time, so the zeros of the resampling matrix cost nothing (area averaging over a 12000-pixel
    axis has ~50 non-zero weights per output row). The band sums the same non-zero terms; BLAS may order them
    differently than the whole product (the last bit of a float64 value), which uint8 rounding absorbs except at
    exact ties.
    """
    h, w = image.shape
    rows_first = rows.shape[0] <= cols.shape[0]
    if 8 * h * w <= block_bytes:
        plane = image.astype(np.float64)
        return (rows @ plane) @ cols.T if rows_first else rows @ (plane @ cols.T)
    if rows_first:  # (rows @ plane) @ cols.T: bands of output rows over the input rows they weigh
        first = np.empty((rows.shape[0], w))
        for (a, b), (k0, k1) in _bands(rows, 8 * w, block_bytes):
            first[a:b] = rows[a:b, k0:k1] @ image[k0:k1].astype(np.float64)
        return first @ cols.T
    first = np.empty((h, cols.shape[0]))  # rows @ (plane @ cols.T): bands of output columns
    for (a, b), (k0, k1) in _bands(cols, 8 * h, block_bytes):
        first[:, a:b] = image[:, k0:k1].astype(np.float64) @ cols[a:b, k0:k1].T
    return rows @ first


def _bands(m: np.ndarray, line_bytes: int, block_bytes: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Groups ``(a, b)`` of consecutive rows of a resampling matrix ``m`` with the input range ``(k0, k1)`` their
    non-zero weights cover, each range at most ``block_bytes / line_bytes`` inputs (or one output row)."""
    nz = m != 0
    lo = np.where(nz.any(axis=1), nz.argmax(axis=1), 0)
    hi = np.where(nz.any(axis=1), m.shape[1] - nz[:, ::-1].argmax(axis=1), 1)
    limit = max(1, block_bytes // max(1, line_bytes))
    bands, a = [], 0
    while a < m.shape[0]:
        b, k0, k1 = a + 1, int(lo[a]), int(hi[a])
        while b < m.shape[0] and max(k1, int(hi[b])) - min(k0, int(lo[b])) <= limit:
            k0, k1 = min(k0, int(lo[b])), max(k1, int(hi[b]))
            b += 1
        bands.append(((a, b), (k0, k1)))
        a = b
    return bands

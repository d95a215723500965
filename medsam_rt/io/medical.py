"""Intensity handling for medical images (numpy): CT windows and MR percentile clipping, to 8 bits.

MedSAM's own preprocessing windows CT Hounsfield units (e.g. soft tissue: level 40, width 400) and clips MR
to the 0.5-99.5 percentiles before scaling to 0-255.
"""

from __future__ import annotations

import numpy as np

from medsam_rt.core.preprocess import row_blocks
from medsam_rt.errors import InvalidImageError

#: CT window presets: name -> (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
}


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map ``[level - width/2, level + width/2]`` linearly to 0..255 (clipped); uint8 result."""
    if not width > 0:
        raise InvalidImageError(f"window width must be > 0, got {width}")
    lo = level - width / 2.0

    def scaled(v: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((v.astype(np.float64) - lo) * (255.0 / width)), 0, 255)

    if values.ndim == 0:
        return scaled(values).astype(np.uint8)
    out = np.empty(values.shape, np.uint8)  # float64 work in row blocks (preprocess.BLOCK_BYTES)
    for rows in row_blocks(values.shape[0], 8 * (values.size // max(1, values.shape[0]))):
        out[rows] = scaled(values[rows])
    return out


def percentile_clip(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the ``low``-``high`` percentiles and scale that range to 0..255; uint8 result."""
    lo, hi = np.percentile(values.astype(np.float64), [low, high])
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return window(values, (lo + hi) / 2.0, hi - lo)

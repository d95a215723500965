"""Ellipse phantoms with known truth for the large-image benchmarks (benchmarks/large_image.py, benchmarks/roi.py).

Each ellipse is drawn in its own window, so a 12000x12000 canvas with a thousand objects costs the canvas
(144 MB) and nothing image-sized besides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Phantom:
    """A uint8 ``(H, W)`` canvas, its ellipses' parameters and boxes.

    Attributes:
        image: uint8 ``(H, W)``: background ~40 with mild noise, ellipses at ~190.
        ellipses: float64 ``(N, 4)``: centre x, centre y, semi-axis a (x), semi-axis b (y), in pixels.
        boxes: float64 ``(N, 4)``: x0, y0, x1, y1, the ellipse's bounding box widened by ``pad`` pixels.
    """

    image: np.ndarray
    ellipses: np.ndarray
    boxes: np.ndarray

    def truth(self, k: int) -> tuple[int, int, np.ndarray]:
        """Ellipse ``k``'s true mask as ``(y0, x0, bool (h, w))`` over its box (original pixels)."""
        x0, y0, x1, y1 = (int(v) for v in self.boxes[k])
        return y0, x0, _ellipse(self.ellipses[k], y0, x0, y1 - y0, x1 - x0)


def _ellipse(e: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    cx, cy, a, b = e
    y, x = np.ogrid[y0 : y0 + h, x0 : x0 + w]
    return ((x + 0.5 - cx) / a) ** 2 + ((y + 0.5 - cy) / b) ** 2 <= 1.0


def make_phantom(size: int, radii: list[tuple[float, float]], *, seed: int = 0, pad: int = 4, gap: int = 6) -> Phantom:
    """Non-overlapping ellipses of the given ``(a, b)`` semi-axes on a ``size x size`` canvas (placed at random
    without overlap of their padded boxes; ellipses that find no place after many tries are left out)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(30, 50, (size, size), dtype=np.uint8) if size <= 4096 else _noise(size, rng)
    taken: list[tuple[float, float, float, float]] = []
    cell = max(64, int(2 * max(max(a, b) for a, b in radii) + 2 * (pad + gap)))
    grid: dict[tuple[int, int], list[int]] = {}
    ellipses, boxes = [], []
    for a, b in radii:
        for _ in range(200):
            cx = rng.uniform(a + pad + 1, size - a - pad - 1)
            cy = rng.uniform(b + pad + 1, size - b - pad - 1)
            box = (np.floor(cx - a) - pad, np.floor(cy - b) - pad, np.ceil(cx + a) + pad, np.ceil(cy + b) + pad)
            gx, gy = int(cx // cell), int(cy // cell)
            near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in grid.get((gx + dx, gy + dy), [])]
            if any(
                box[0] < t[2] + gap and t[0] < box[2] + gap and box[1] < t[3] + gap and t[1] < box[3] + gap
                for t in (taken[j] for j in near)
            ):
                continue
            grid.setdefault((gx, gy), []).append(len(taken))
            taken.append(box)
            ellipses.append((cx, cy, a, b))
            boxes.append(box)
            break
    ellipses_arr, boxes_arr = np.array(ellipses, np.float64), np.array(boxes, np.float64)
    for e, (x0, y0, x1, y1) in zip(ellipses_arr, boxes_arr.astype(int), strict=True):
        inside = _ellipse(e, y0, x0, y1 - y0, x1 - x0)
        window = image[y0:y1, x0:x1]
        window[inside] = np.uint8(190) + (window[inside] % 8)
    return Phantom(image, ellipses_arr, boxes_arr)


def _noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """A large noisy background in row blocks (no int64 temporaries of the canvas)."""
    out = np.empty((size, size), np.uint8)
    for r in range(0, size, 1024):
        out[r : r + 1024] = rng.integers(30, 50, (min(1024, size - r), size), dtype=np.uint8)
    return out


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks of one shape (1.0 when both are empty)."""
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


def crop_dice(crop, y0: int, x0: int, truth: np.ndarray) -> float:
    """Dice of a :class:`~medsam_rt.core.masks.MaskCrop` against ``truth`` placed at ``(y0, x0)`` (original pixels)."""
    h, w = truth.shape
    cy0, cx0 = crop.y0, crop.x0
    ch, cw = crop.mask.shape
    ya, yb = min(y0, cy0), max(y0 + h, cy0 + ch)
    xa, xb = min(x0, cx0), max(x0 + w, cx0 + cw)
    p = np.zeros((yb - ya, xb - xa), bool)
    t = np.zeros_like(p)
    p[cy0 - ya : cy0 - ya + ch, cx0 - xa : cx0 - xa + cw] = crop.mask
    t[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w] = truth
    return dice(p, t)

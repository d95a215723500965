"""Synthetic phantoms with known ground truth (numpy only): ellipses on a noisy, textured background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Phantom:
    """An image with one ground-truth object.

    Attributes:
        image: ``(H, W)`` uint8 or uint16 grayscale image.
        mask: bool ``(H, W)`` ground truth.
        box: float64 ``(4,)`` x0, y0, x1, y1: the mask's bounding box padded by ``margin`` pixels, clipped.
        name: short description.
    """

    image: np.ndarray
    mask: np.ndarray
    box: np.ndarray
    name: str


def ellipse_phantom(
    height: int = 512,
    width: int = 512,
    *,
    seed: int = 0,
    dtype: type = np.uint8,
    contrast: float = 0.45,
    noise: float = 0.05,
    margin: int = 5,
) -> Phantom:
    """A bright ellipse (random centre, axes, angle) on a smooth background with Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ay, ax = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
    mask = u * u + v * v <= 1.0
    background = 0.25 + 0.1 * np.sin(xx / width * 3 + rng.uniform(0, 6)) * np.cos(yy / height * 2)
    img = background + contrast * mask + rng.normal(0, noise, (height, width))
    img = np.clip(img, 0, 1)
    top = 255 if dtype == np.uint8 else 65535
    ys, xs = np.nonzero(mask)
    box = np.array(
        [
            max(0, xs.min() - margin),
            max(0, ys.min() - margin),
            min(width, xs.max() + 1 + margin),
            min(height, ys.max() + 1 + margin),
        ],
        np.float64,
    )
    return Phantom((img * top).round().astype(dtype), mask, box, f"ellipse {height}x{width} {np.dtype(dtype).name}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total

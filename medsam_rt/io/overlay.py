"""The overlay figure: left, the image with its boxes; right, the image with the masks overlaid and the boxes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from medsam_rt.core.masks import Masks
from medsam_rt.core.preprocess import to_rgb_uint8
from medsam_rt.core.volume import VolumeSegmentation, slice_ranges

PALETTE = np.array(
    [(30, 144, 255), (255, 99, 71), (50, 205, 50), (255, 215, 0), (186, 85, 211), (0, 206, 209), (255, 140, 0)],
    np.uint8,
)


def overlay_figure(rgb: np.ndarray, boxes: np.ndarray, masks: Masks | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Build the side-by-side figure.

    Args:
        rgb: uint8 ``(H, W, 3)`` image.
        boxes: ``(N, 4)`` x0, y0, x1, y1 in the image's pixels.
        masks: the N masks as crops (:class:`~medsam_rt.core.masks.Masks`), or bool ``(N, H, W)``.

    Returns:
        uint8 ``(H, 2 * W + gap, 3)`` figure.
    """
    h, w = rgb.shape[:2]
    blended = rgb.astype(np.float32)
    everywhere = (slice(None), slice(None))
    for k, crop in enumerate(masks):
        window, mask = (crop.window(), crop.mask) if not isinstance(crop, np.ndarray) else (everywhere, crop)
        region = blended[window]  # each mask blends over its crop only
        color = PALETTE[k % len(PALETTE)].astype(np.float32)
        region[mask] = (1 - alpha) * region[mask] + alpha * color
    gap = max(4, w // 50)
    fig = np.full((h, 2 * w + gap, 3), 255, np.uint8)
    fig[:, :w] = rgb
    fig[:, w + gap :] = blended.round().astype(np.uint8)
    img = Image.fromarray(fig)
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(h, w) / 300))
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        color = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        for dx in (0, w + gap):
            draw.rectangle([x0 + dx, y0, max(x0, x1 - 1) + dx, max(y0, y1 - 1)], outline=color, width=width)
    return np.asarray(img)


def overlay_grid(figures: list[np.ndarray], labels: list[str] | None = None, max_width: int = 4096) -> np.ndarray:
    """Tile per-slice figures (same size) into a near-square grid at most ``max_width`` pixels wide, each with
    its label (e.g. ``"slice 12"``) in the corner."""
    h, w = figures[0].shape[:2]
    cols = int(np.ceil(np.sqrt(len(figures))))
    rows = int(np.ceil(len(figures) / cols))
    scale = min(1.0, max_width / (cols * w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    grid = Image.new("RGB", (cols * tw, rows * th), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, fig in enumerate(figures):
        tile = Image.fromarray(fig)
        if (th, tw) != (h, w):
            tile = tile.resize((tw, th), Image.Resampling.BILINEAR)
        x, y = (k % cols) * tw, (k // cols) * th
        grid.paste(tile, (x, y))
        if labels:
            draw.text((x + 3, y + 2), labels[k], fill=(255, 255, 0))
    return np.asarray(grid)


def overlay_volume(volume: np.ndarray, result: VolumeSegmentation) -> np.ndarray:
    """A grid with, per object, its ``z_mid`` slice: every object's mask there and the boxes of the objects that
    span the slice (colours by label); uint8 ``(H', W', 3)``."""
    n = len(result.boxes3d)
    z_lo, z_mid, z_hi = slice_ranges(result.boxes3d)
    off = np.full(4, -10.0)  # drawn outside the image: objects that do not span the slice
    figures, names = [], []
    for k in range(n):
        z = int(z_mid[k])
        boxes = np.stack([result.boxes3d[j, [0, 1, 3, 4]] if z_lo[j] <= z <= z_hi[j] else off for j in range(n)])
        masks = np.stack([result.labels[z] == j + 1 for j in range(n)])
        figures.append(overlay_figure(to_rgb_uint8(volume[z]), boxes, masks))
        names.append(f"object {k + 1}, slice {z}")
    return figures[0] if n == 1 else overlay_grid(figures, names)

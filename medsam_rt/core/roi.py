"""Small structures in huge images: embed a crop around each box, at the encoder's resolution (optional mode).

Resizing a 12000x12000 slide to LiteMedSAM's 256 pixels (or ViT-B's 1024) shrinks a 30-pixel nucleus to less than
one pixel; the decoder cannot draw it. :func:`segment_roi` instead cuts a square window around each box (boxes close
together share one window), embeds each window as its own image and decodes its boxes there, so every object is
seen at a scale the model knows. Masks come back as one :class:`~medsam_rt.Segmentation` in original-image
coordinates, like :meth:`MedSAM.segment`'s.

Windows (original pixels): a box of side ``s = max(w, h)`` gets a square of side ``max(min_side, (1 + 2 *
margin) * s)`` centred on it (default ``margin=0.5``: the box fills half the window, about as large as objects were
in training images; ``min_side`` defaults to half the encoder's input, 128 pixels for LiteMedSAM, so a tiny box is
enlarged at most 4x), moved inside the image where it would cross an edge, and clipped to the image when larger.
Boxes are grouped greedily (in reading order of their centres): a box joins a window when the union of the
group's boxes, with the same margin, still fits in ``max_side`` (default: the encoder's input size x 2). Cost: one
encoder run per window (the whole-image mode runs it once), so use it when objects are small against the image (a
box under ~5 % of the longest side at LiteMedSAM's 256) and not when a few large objects fill the image
(docs/large-images.md has the measured Dice by object size).

The default (``MedSAM.segment`` on one embedding of the whole image) stays the reference behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam_rt.core.masks import MaskCrop, Masks
from medsam_rt.core.postprocess import UpscaleChain
from medsam_rt.core.preprocess import validate_boxes

#: Window margin around a box, as a fraction of its longest side on each side.
DEFAULT_MARGIN = 0.5


@dataclass(frozen=True)
class Window:
    """One crop of the image embedded on its own.

    Attributes:
        y0, x0: its top-left pixel in the original image; h, w: its size.
        boxes: indices of the boxes decoded in it.
    """

    y0: int
    x0: int
    h: int
    w: int
    boxes: tuple[int, ...]


def _square(cx: float, cy: float, side: float, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square of ``side`` centred on ``(cx, cy)``, moved inside the image, clipped to it: ``y0, x0, h, w``."""
    h, w = image_size
    sy, sx = min(h, int(np.ceil(side))), min(w, int(np.ceil(side)))
    y0 = int(np.clip(round(cy - sy / 2), 0, h - sy))
    x0 = int(np.clip(round(cx - sx / 2), 0, w - sx))
    return y0, x0, sy, sx


def plan_windows(
    boxes: Any,
    image_size: tuple[int, int],
    encoder_size: int,
    *,
    margin: float = DEFAULT_MARGIN,
    min_side: int | None = None,
    max_side: int | None = None,
) -> list[Window]:
    """Group ``(N, 4)`` boxes (x0, y0, x1, y1, original pixels) into windows (see the module docstring).

    Raises:
        InvalidBoxError: malformed or out-of-image boxes.
        ValueError: a negative margin or non-positive sides.
    """
    boxes = validate_boxes(boxes, image_size)
    min_side = encoder_size // 2 if min_side is None else int(min_side)
    max_side = 2 * encoder_size if max_side is None else int(max_side)
    if margin < 0 or min_side <= 0 or max_side < min_side:
        raise ValueError(f"roi margin={margin}, min_side={min_side}, max_side={max_side}: expected margin >= 0 and "
                         "0 < min_side <= max_side")  # fmt: skip

    def side_of(union: np.ndarray) -> float:  # the square window's side around a union box
        return max(min_side, (1 + 2 * margin) * float(max(union[2] - union[0], union[3] - union[1])))

    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    band = max(min_side, 1)
    order = sorted(range(len(boxes)), key=lambda k: (int(centres[k, 1] // band), centres[k, 0]))
    groups: list[tuple[np.ndarray, list[int]]] = []  # union box, members
    for k in order:
        placed = False
        for g, (union, members) in enumerate(groups[-8:], start=max(0, len(groups) - 8)):  # recent windows only
            merged = np.r_[np.minimum(union[:2], boxes[k, :2]), np.maximum(union[2:], boxes[k, 2:])]
            if side_of(merged) <= max_side:
                groups[g] = (merged, [*members, k])
                placed = True
                break
        if not placed:
            groups.append((boxes[k].copy(), [k]))
    windows = []
    for union, members in groups:
        y0, x0, h, w = _square((union[0] + union[2]) / 2, (union[1] + union[3]) / 2, side_of(union), image_size)
        windows.append(Window(y0, x0, h, w, tuple(sorted(members))))
    return windows


class RoiUpscale:
    """The upscaling of a windowed segmentation: box ``k``'s logits live in its window's encoder frame.

    ``self(low_res)`` gives float32 ``(n, H, W)`` logits at the original resolution for the boxes in order (``-inf``
    outside each box's window, where its mask is background); ``window(values, rows, cols)`` as
    :meth:`~medsam_rt.core.postprocess.UpscaleChain.window` for box ``k``'s logits (rows and columns inside its window).
    ``windows``: the windows that were embedded.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        chains: list[UpscaleChain],
        offsets: list[tuple[int, int]],
        windows: list[Window],
    ):
        self.image_size = image_size
        self._chains, self._offsets = chains, offsets
        self.windows = windows

    def window_of(self, k: int, values: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        oy, ox = self._offsets[k]
        return self._chains[k].window(values, (rows[0] - oy, rows[1] - oy), (cols[0] - ox, cols[1] - ox))

    def __call__(self, low_res_logits: np.ndarray) -> np.ndarray:
        out = np.full((len(low_res_logits), *self.image_size), -np.inf, np.float32)
        for k, logits in enumerate(low_res_logits):
            (oy, ox), c = self._offsets[k], self._chains[k]
            h, w = c.original_size
            out[k, oy : oy + h, ox : ox + w] = c(logits[None])[0]
        return out


def segment_roi(
    model: Any,
    image: np.ndarray,
    boxes: Any,
    *,
    margin: float = DEFAULT_MARGIN,
    min_side: int | None = None,
    max_side: int | None = None,
) -> Any:
    """Segment ``boxes`` on ``image`` with one embedding per window around them (see the module docstring).

    Args:
        model: a loaded :class:`~medsam_rt.MedSAM`.
        image: the image as :meth:`MedSAM.embed` takes it (an array; windows are cut from it, no copy of the rest).
        boxes: ``(N, 4)`` x0, y0, x1, y1 in original pixels.
        margin, min_side, max_side: window geometry (original pixels; defaults from the encoder's input size).

    Returns:
        :class:`~medsam_rt.Segmentation`: ``boxes`` and ``crops`` in original coordinates, ``scores``;
        ``low_res_logits[k]`` is in box ``k``'s window's encoder frame and ``upscale`` a :class:`RoiUpscale`.
        :attr:`windows` of the result's ``upscale`` lists the windows used.

    Raises:
        InvalidBoxError, InvalidImageError: as :meth:`MedSAM.segment` / :meth:`MedSAM.embed`.
    """
    from medsam_rt.core.model import Segmentation

    if isinstance(image, (str, bytes)) or not isinstance(image, np.ndarray):
        from medsam_rt.core.images import read_image

        image = read_image(image)
    size = (int(image.shape[0]), int(image.shape[1]))
    boxes = validate_boxes(boxes, size)
    p = model.preprocessing
    windows = plan_windows(boxes, size, max(p.pad_size), margin=margin, min_side=min_side, max_side=max_side)
    n = len(boxes)
    crops: list[MaskCrop | None] = [None] * n
    scores = np.zeros(n, np.float32)
    low_res: list[np.ndarray | None] = [None] * n
    chains: list[UpscaleChain | None] = [None] * n
    offsets: list[tuple[int, int]] = [(0, 0)] * n
    for win in windows:
        part = image[win.y0 : win.y0 + win.h, win.x0 : win.x0 + win.w]
        members = list(win.boxes)
        local = boxes[members] - np.array([win.x0, win.y0, win.x0, win.y0], np.float64)
        seg = model.segment(model.embed(part), np.clip(local, 0, [win.w, win.h, win.w, win.h]))
        up = seg.upscale
        for j, k in enumerate(members):
            c = seg.crops[j]
            crops[k] = MaskCrop(c.y0 + win.y0, c.x0 + win.x0, c.mask) if c.mask.size else MaskCrop.empty()
            scores[k] = seg.scores[j]
            low_res[k] = seg.low_res_logits[j]
            chains[k], offsets[k] = up, (win.y0, win.x0)
    upscale = RoiUpscale(size, chains, offsets, windows)  # type: ignore[arg-type]
    logits = np.stack(low_res)  # type: ignore[arg-type]
    masks = Masks(size, crops, logits_in=lambda k, rows, cols: upscale.window_of(k, logits[k], rows, cols))
    return Segmentation(boxes=boxes, crops=masks, scores=scores, low_res_logits=logits, upscale=upscale)


__all__ = ["DEFAULT_MARGIN", "RoiUpscale", "Window", "plan_windows", "segment_roi"]

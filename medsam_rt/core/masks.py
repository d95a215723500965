"""Masks stored where they are: one box's mask as a tight crop plus its offset in the image.

A mask of a 30-pixel nucleus on a 12000x12000 slide is a few hundred bytes as a crop and 144 MB as a full
``(H, W)`` plane. :class:`MaskCrop` is the one representation every part of medsam-rt works from (label images,
areas, bounding boxes, every writer); :class:`Masks` holds one per box with the image size, and builds the dense
``(N, H, W)`` stack only when asked (:meth:`Masks.dense`).

Label images (:meth:`Masks.label_image`): 0 background, ``k`` for the ``k``-th mask (1-based); uint8 for up to
255 masks, uint16 for up to 65535 (:func:`label_dtype`); where masks overlap, the pixel goes to the mask whose
upscaled logit there is the highest (the most probable), the first on ties.

The ``.npz`` layout of :meth:`Masks.to_arrays` / :meth:`Masks.from_arrays` (``medsam-rt segment --out x.npz``):

- ``mask_format``: the string ``"crops"`` (``"dense"`` when the full stack was asked for: ``masks``);
- ``image_size``: int64 ``(2,)``: ``H, W`` of the slice the masks belong to;
- ``offsets``: int64 ``(M, 2)``: ``y0, x0`` (row, column) of each mask's crop;
- ``shapes``: int64 ``(M, 2)``: ``h, w`` of each crop (``0, 0`` for an empty mask);
- ``crops``: bool ``(sum of h * w,)``: every crop's pixels, row-major, one after the other in mask order.

Mask ``k`` is ``dense[k, y0 : y0 + h, x0 : x0 + w] = crops[start : start + h * w].reshape(h, w)`` with ``start``
the sum of the earlier crops' sizes; everything else is ``False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsam_rt.errors import LabelOverflowError, MaskFormatError

#: The most masks a label image holds (uint16).
MAX_LABELS = 65535

#: ``logits_in(k, (a, b), (c, d)) -> float64 (b - a, d - c)``: mask ``k``'s upscaled logits on image rows
#: ``a:b`` and columns ``c:d``; used to give overlapping pixels to the most probable mask.
LogitsIn = Callable[[int, tuple[int, int], tuple[int, int]], np.ndarray]
#: Label images are built in row blocks of at most this many pixels (bounded temporaries for huge crops).
_LABEL_BLOCK = 1 << 22


def label_dtype(n: int) -> type[np.unsignedinteger]:
    """The label image dtype for ``n`` masks: uint8 up to 255, uint16 up to 65535.

    Raises:
        LabelOverflowError: ``n > 65535``.
    """
    if n <= 255:
        return np.uint8
    if n <= MAX_LABELS:
        return np.uint16
    raise LabelOverflowError(
        f"{n} masks: a label image numbers at most {MAX_LABELS} (uint16); write per-mask crops (.npz) instead"
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


_EMPTY = _frozen(np.zeros((0, 0), bool))


@dataclass(frozen=True, eq=False)
class MaskCrop:
    """One mask where it is, in the original image's pixels (y = row, x = column).

    Attributes:
        y0, x0: top-left pixel of the crop (``0, 0`` for an empty mask).
        mask: bool ``(h, w)`` (made read-only): the mask on rows ``y0 : y0 + h`` and columns ``x0 : x0 + w``; every
            pixel outside the crop is background. Tight: its first and last row and column each hold a ``True``
            pixel (as medsam-rt makes them); an empty mask is ``(0, 0)``.
    """

    y0: int
    x0: int
    mask: np.ndarray

    def __post_init__(self) -> None:
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != bool or m.ndim != 2:
            got = f"{m.dtype} {m.shape}" if isinstance(m, np.ndarray) else type(m).__name__
            raise MaskFormatError(f"a mask crop is a 2-D bool array, got {got}")
        if int(self.y0) < 0 or int(self.x0) < 0:
            raise MaskFormatError(f"a mask crop's offset is non-negative, got y0={self.y0}, x0={self.x0}")
        object.__setattr__(self, "y0", int(self.y0))
        object.__setattr__(self, "x0", int(self.x0))
        m.setflags(write=False)

    @classmethod
    def empty(cls) -> MaskCrop:
        return cls(0, 0, _EMPTY)

    @classmethod
    def from_dense(cls, mask: np.ndarray, y0: int = 0, x0: int = 0) -> MaskCrop:
        """The tight crop of bool ``mask`` (``(h, w)``, whose pixel ``(0, 0)`` is image pixel ``(y0, x0)``).
        Costs one pass over ``mask``."""
        mask = np.asarray(mask, bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return cls.empty()
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(y0 + r0, x0 + c0, np.array(mask[r0:r1, c0:c1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    @property
    def area(self) -> int:
        """Pixels in the mask (one pass over the crop)."""
        return int(np.count_nonzero(self.mask))

    @property
    def bounding_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in pixels, ends exclusive (the box convention); ``(0, 0, 0, 0)`` when empty."""
        h, w = self.mask.shape
        return (self.x0, self.y0, self.x0 + w, self.y0 + h) if h else (0, 0, 0, 0)

    def window(self) -> tuple[slice, slice]:
        """The image region the crop covers, as ``image[rows, cols]`` indices."""
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    def dense(self, image_size: tuple[int, int]) -> np.ndarray:
        """bool ``(H, W)``: the mask on the whole image (H * W bytes)."""
        out = np.zeros(image_size, bool)
        self.paste(out)
        return out

    def paste(self, out: np.ndarray, value: Any = True) -> None:
        """Set ``out[y, x] = value`` wherever the mask is set (``out``: an ``(H, W)`` image)."""
        if self.mask.size:
            np.copyto(out[self.window()], value, where=self.mask)


@dataclass(frozen=True, eq=False)
class Masks(Sequence[MaskCrop]):
    """The masks of N boxes on one image, each stored as its crop.

    Attributes:
        image_size: ``(H, W)`` of the image.
        crops: one :class:`MaskCrop` per box, in box order.
        logits_in: mask ``k``'s upscaled logits on a window (see :data:`LogitsIn`), used to give overlapping
            pixels to the most probable mask; ``None`` (e.g. masks read from a file): overlaps go to the first.
    """

    image_size: tuple[int, int]
    crops: tuple[MaskCrop, ...]
    logits_in: LogitsIn | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        h, w = (int(v) for v in self.image_size)
        object.__setattr__(self, "image_size", (h, w))
        object.__setattr__(self, "crops", tuple(self.crops))
        for k, c in enumerate(self.crops):
            if not isinstance(c, MaskCrop):
                raise MaskFormatError(f"mask {k} is a {type(c).__name__}, not a MaskCrop")
            ch, cw = c.shape
            if ch and (c.y0 + ch > h or c.x0 + cw > w):
                raise MaskFormatError(
                    f"mask {k}'s crop (rows {c.y0}:{c.y0 + ch}, columns {c.x0}:{c.x0 + cw}) lies outside the "
                    f"{h}x{w} image"
                )

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, k):  # type: ignore[override]
        return self.crops[k]

    def __iter__(self) -> Iterator[MaskCrop]:
        return iter(self.crops)

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> Masks:
        """Crops of a bool ``(N, H, W)`` stack (one pass over it)."""
        masks = np.asarray(masks, bool)
        if masks.ndim != 3:
            raise MaskFormatError(f"a mask stack is (N, H, W), got shape {masks.shape}")
        return cls(masks.shape[1:], tuple(MaskCrop.from_dense(m) for m in masks))

    def dense(self) -> np.ndarray:
        """bool ``(N, H, W)``: every mask on the whole image. Costs ``N * H * W`` bytes (a 12000x12000 image
        with 255 boxes: 34 GiB): prefer the crops for large images or many boxes."""
        out = np.zeros((len(self), *self.image_size), bool)
        for k, c in enumerate(self.crops):
            c.paste(out[k])
        return out

    def areas(self) -> np.ndarray:
        """int64 ``(N,)``: pixels per mask."""
        return np.array([c.area for c in self.crops], np.int64)

    def bounding_boxes(self) -> np.ndarray:
        """int64 ``(N, 4)``: each mask's ``x0, y0, x1, y1`` (ends exclusive); ``0, 0, 0, 0`` for an empty one."""
        return np.array([c.bounding_box for c in self.crops], np.int64).reshape(-1, 4)

    def label_image(self) -> np.ndarray:
        """uint8 (up to 255 masks) or uint16 (up to 65535) ``(H, W)``: 0 background, ``k`` for mask ``k``
        (1-based). A pixel in several masks goes to the one whose upscaled logit there is the highest (the most
        probable), the first on ties; without :attr:`logits_in`, to the first. Costs the label image plus, per
        mask, a pass over its crop; logits are computed only where masks overlap.

        Raises:
            LabelOverflowError: more than 65535 masks.
        """
        labels = np.zeros(self.image_size, label_dtype(len(self)))
        self.paste_labels(labels)
        return labels

    def paste_labels(self, labels: np.ndarray) -> None:
        """Write the label image into ``labels`` (a zeroed ``(H, W)`` array of :func:`label_dtype`'s type or
        wider, e.g. a view into a label volume); see :meth:`label_image`.

        The image is done in row blocks; in each, the masks in order, each over its crop. Where a mask meets
        pixels already labelled, its logits and the owners' are computed there (each once per pixel: the owner's
        logit is kept for the block), and it takes the pixels where its logit is strictly higher.
        """
        if labels.shape != self.image_size:
            raise MaskFormatError(f"labels of shape {labels.shape} for masks on a {self.image_size} image")
        label_dtype(len(self))  # refuses before any work
        h, w = self.image_size
        top = np.array([c.y0 for c in self.crops], np.int64)
        bottom = np.array([c.y0 + c.shape[0] for c in self.crops], np.int64)
        step = max(1, _LABEL_BLOCK // max(1, w))
        for a in range(0, h, step):
            b = min(h, a + step)
            best = None  # float64 (b - a, w): the owner's logit where computed, NaN elsewhere
            for k in np.flatnonzero((top < b) & (bottom > a)).tolist():
                c = self.crops[k]
                ra, rb = max(a, c.y0), min(b, c.y0 + c.shape[0])
                cols = slice(c.x0, c.x0 + c.shape[1])
                reg, mask = labels[ra:rb, cols], c.mask[ra - c.y0 : rb - c.y0]
                taken = reg != 0
                taken &= mask
                np.copyto(reg, k + 1, where=mask & ~taken)
                if self.logits_in is not None and taken.any():
                    if best is None:
                        best = np.full((b - a, w), np.nan)
                    self._contest(k, ra, c.x0, reg, taken, best[ra - a : rb - a, cols])

    def _contest(self, k: int, y: int, x: int, reg: np.ndarray, taken: np.ndarray, best: np.ndarray) -> None:
        """Give mask ``k`` the pixels of ``taken`` (labelled before, also in mask ``k``) where its logit beats the
        owner's. ``reg``, ``taken``, ``best``: views of one window whose pixel ``(0, 0)`` is image pixel
        ``(y, x)``; ``best`` holds the owners' logits where known (NaN: not computed yet) and is kept current."""
        rows, cols = np.flatnonzero(taken.any(axis=1)), np.flatnonzero(taken.any(axis=0))
        ta, tb, tc, td = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        reg, taken, best = reg[ta:tb, tc:td], taken[ta:tb, tc:td], best[ta:tb, tc:td]
        y, x = y + ta, x + tc
        unknown = taken & np.isnan(best)
        for j in (np.unique(reg[unknown]).astype(np.int64) - 1).tolist():  # owners whose logits are unknown there
            o = self.crops[j]
            ya, yb = max(y, o.y0), min(y + tb - ta, o.y0 + o.shape[0])
            xa, xb = max(x, o.x0), min(x + td - tc, o.x0 + o.shape[1])
            at = (slice(ya - y, yb - y), slice(xa - x, xb - x))
            need = reg[at] == j + 1
            need &= unknown[at]
            np.copyto(best[at], self.logits_in(j, (ya, yb), (xa, xb)), where=need)
        mine = self.logits_in(k, (y, y + tb - ta), (x, x + td - tc))
        win = mine > best
        win &= taken
        reg[win] = k + 1
        np.copyto(best, mine, where=reg == k + 1)  # its logits where it holds the pixel, for later masks

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` arrays of this module's layout (``mask_format`` ``"crops"``)."""
        offsets = np.array([(c.y0, c.x0) for c in self.crops], np.int64).reshape(-1, 2)
        shapes = np.array([c.shape for c in self.crops], np.int64).reshape(-1, 2)
        flat = [c.mask.ravel() for c in self.crops if c.mask.size]
        crops = np.concatenate(flat) if flat else np.zeros(0, bool)
        return {
            "mask_format": np.array("crops"),
            "image_size": np.array(self.image_size, np.int64),
            "offsets": offsets,
            "shapes": shapes,
            "crops": crops,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], select: np.ndarray | None = None) -> Masks:
        """Masks from :meth:`to_arrays`'s arrays (or a loaded ``.npz``); ``select`` (bool or indices) keeps some.

        Raises:
            MaskFormatError: missing keys, inconsistent sizes or crops outside the image.
        """
        try:
            fmt = str(arrays["mask_format"])
            if fmt == "dense":
                stack = np.asarray(arrays["masks"], bool)
                return cls.from_dense(stack if select is None else stack[select])
            if fmt != "crops":
                raise MaskFormatError(f"unknown mask_format {fmt!r}; expected 'crops' or 'dense'")
            size = tuple(int(v) for v in np.asarray(arrays["image_size"]).reshape(-1))
            offsets = np.asarray(arrays["offsets"], np.int64).reshape(-1, 2)
            shapes = np.asarray(arrays["shapes"], np.int64).reshape(-1, 2)
            flat = np.asarray(arrays["crops"], bool).reshape(-1)
        except KeyError as exc:
            raise MaskFormatError(f"mask arrays lack {exc.args[0]!r}") from None
        sizes = shapes[:, 0] * shapes[:, 1]
        if len(size) != 2 or len(offsets) != len(shapes) or (shapes < 0).any() or int(sizes.sum()) != flat.size:
            raise MaskFormatError(
                f"mask arrays are inconsistent: image_size {size}, {len(offsets)} offsets, {len(shapes)} shapes, "
                f"{flat.size} crop pixels for {int(sizes.sum())} expected"
            )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        crops = [
            MaskCrop(int(y0), int(x0), flat[a:b].reshape(int(h), int(w))) if h * w else MaskCrop.empty()
            for (y0, x0), (h, w), a, b in zip(offsets, shapes, starts[:-1], starts[1:], strict=True)
        ]
        if select is not None:
            crops = list(np.array(crops, dtype=object)[select])
        return cls(size, tuple(crops))


__all__ = ["MAX_LABELS", "LabelOverflowError", "LogitsIn", "MaskCrop", "MaskFormatError", "Masks", "label_dtype"]

"""Image and box preprocessing, in numpy (+ Pillow for its resampling filters).

The recipe is *declared* by the model directory's manifest (``preprocessing``)
and parsed into :class:`Preprocessing`; nothing here is special-cased by model
name. The vocabulary, one implementation per entry:

- intake: any image becomes ``(H, W, 3) uint8`` (:func:`to_rgb_uint8`; grayscale as one plane seen as three
  channels, conversions in row blocks: memory stays near the decoded image's, see :data:`BLOCK_BYTES`);
- ``resize``: ``longest_side`` (max(H, W) -> ``size``, aspect kept, sides
  rounded half up) or ``square`` (``size`` x ``size``, aspect ignored);
- ``interpolation``: a Pillow filter (``bilinear``, ``bicubic``, ...) or
  ``area`` (OpenCV ``INTER_AREA``, :mod:`medsam_rt.core.resample`); the resized
  image is uint8, as both references produce;
- ``normalize``: ``rescale_mean_std`` (``(x * rescale_factor - mean) / std``,
  transformers' ``SamImageProcessor``) or ``minmax`` (``(x - min) / max(max -
  min, 1e-8)`` over the resized image, MedSAM's and LiteMedSAM's recipes);
- zero padding bottom-right to ``pad_size``, channels first;
- ``box_scale``: ``per_axis`` (x * resized_w / W, y * resized_h / H) or
  ``longest_side`` (both * size / max(H, W)); ``box_round``: ``none`` or
  ``floor`` (LiteMedSAM's reference truncates box coordinates to integers);
- ``postprocess`` (see :mod:`medsam_rt.core.postprocess`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from medsam_rt.core.resample import BLOCK_BYTES, apply_separable, area_matrices
from medsam_rt.errors import InvalidBoxError, InvalidImageError, ModelDirError

#: Pillow resampling filters by the names the manifest uses.
PIL_FILTERS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
INTERPOLATIONS = (*PIL_FILTERS, "area")
RESIZE_MODES = ("longest_side", "square")
NORMALIZE_MODES = ("rescale_mean_std", "minmax")
BOX_SCALES = ("per_axis", "longest_side")
BOX_ROUNDINGS = ("none", "floor")
POSTPROCESS_MODES = ("upscale_crop_resize", "crop_resize", "resize")


@dataclass(frozen=True)
class Preprocessing:
    """A preprocessing recipe as declared in a manifest (vocabulary: see the module docstring).

    Attributes:
        resize: ``"longest_side"`` or ``"square"``.
        size: target length of the longest side (or of both sides), in pixels.
        interpolation: Pillow filter name or ``"area"``.
        normalize: ``"rescale_mean_std"`` or ``"minmax"``.
        rescale_factor, image_mean, image_std: ``rescale_mean_std`` parameters (R, G, B).
        pad_size: ``(height, width)`` of the encoder input; padding is bottom-right zeros.
        box_scale, box_round: how boxes map from original pixels to the encoder frame.
        postprocess: ``"upscale_crop_resize"`` (low-res -> ``pad_size``, crop the
            resized region, -> original size; transformers), ``"crop_resize"``
            (crop the resized region at low resolution, -> original size;
            LiteMedSAM) or ``"resize"`` (low-res -> original size; MedSAM's square recipe).
        mask_threshold: threshold on the logits (0.0 == probability 0.5).
    """

    resize: str
    size: int
    interpolation: str
    normalize: str
    pad_size: tuple[int, int]
    postprocess: str
    rescale_factor: float = 1.0
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    box_scale: str = "per_axis"
    box_round: str = "none"
    mask_threshold: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Parse and validate a manifest's ``preprocessing`` entry (raises :class:`ModelDirError`)."""
        try:
            p = cls(
                resize=str(data["resize"]),
                size=int(data["size"]),
                interpolation=str(data["interpolation"]),
                normalize=str(data["normalize"]),
                pad_size=(int(data["pad_size"][0]), int(data["pad_size"][1])),
                postprocess=str(data["postprocess"]),
                rescale_factor=float(data.get("rescale_factor", 1.0)),
                image_mean=_triple(data.get("image_mean", 0.0)),
                image_std=_triple(data.get("image_std", 1.0)),
                box_scale=str(data.get("box_scale", "per_axis")),
                box_round=str(data.get("box_round", "none")),
                mask_threshold=float(data.get("mask_threshold", 0.0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelDirError(f"manifest 'preprocessing' is malformed: {exc!r}") from None
        for name, value, allowed in (
            ("resize", p.resize, RESIZE_MODES),
            ("interpolation", p.interpolation, INTERPOLATIONS),
            ("normalize", p.normalize, NORMALIZE_MODES),
            ("box_scale", p.box_scale, BOX_SCALES),
            ("box_round", p.box_round, BOX_ROUNDINGS),
            ("postprocess", p.postprocess, POSTPROCESS_MODES),
        ):
            if value not in allowed:
                raise ModelDirError(f"manifest preprocessing {name}={value!r} unsupported; expected one of {allowed}")
        if p.size <= 0 or min(p.pad_size) < p.size or any(s == 0 for s in p.image_std):
            raise ModelDirError(f"manifest preprocessing sizes are inconsistent: size={p.size}, pad_size={p.pad_size}")
        if p.postprocess == "resize" and (p.resize != "square" or p.pad_size != (p.size, p.size)):
            raise ModelDirError("manifest postprocess='resize' needs resize='square' with no padding")
        return p

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["pad_size"] = list(self.pad_size)
        return d


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 channel values, got {len(t)}")
    return t  # type: ignore[return-value]


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Bring any supported image array to ``(H, W, 3) uint8``.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` arrays of
    bool, integer or floating dtype. ``uint8`` is kept as is; any other dtype
    (16-bit, signed, float) is min-max scaled to 0..255 and rounded, the way
    MedSAM's own preprocessing brings CT/MR intensities to 8 bits (a constant
    image becomes all zeros). Grayscale is repeated to three channels; RGBA is
    composited onto white (what a viewer shows, and what transformers >= 5's
    ``convert_to_rgb`` does; alpha is read as 0..max of an integer dtype or
    0..1 for floats).

    Memory: a grayscale result is a read-only view repeating one ``(H, W)`` plane three times (channel stride
    0: no 3-channel copy; ``np.array(rgb)`` gives a writable one), and contiguous uint8 RGB input is returned
    as is; conversions run in row blocks of at most :data:`BLOCK_BYTES` of float64 temporaries, so intake never
    holds a full-size float copy.

    Raises:
        InvalidImageError: wrong type, shape, empty, or NaN/Inf values.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"image must be a numpy array or a file path, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(
            f"image array has shape {image.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidImageError(f"image is empty: shape {image.shape}")
    if image.dtype == np.bool_:
        image = image.view(np.uint8) * np.uint8(255)
    elif not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InvalidImageError(f"image dtype {image.dtype} is not supported; expected an integer or float dtype")
    if image.ndim == 3 and image.shape[2] == 4:
        return _composite_on_white(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype != np.uint8:
        image = _minmax_uint8(image)
    if image.ndim == 2:  # one plane, seen as three channels
        return np.broadcast_to(image[:, :, None], (*image.shape, 3))
    return np.ascontiguousarray(image)


def row_blocks(num_rows: int, row_bytes: int, budget: int | None = None) -> list[slice]:
    """Slices of ``range(num_rows)`` whose rows take at most ``budget`` bytes each (default :data:`BLOCK_BYTES`;
    at least one row)."""
    step = max(1, (BLOCK_BYTES if budget is None else budget) // max(1, row_bytes))
    return [slice(r, min(r + step, num_rows)) for r in range(0, num_rows, step)]


def shared_plane(rgb: np.ndarray) -> np.ndarray | None:
    """The ``(H, W)`` plane of a grayscale :func:`to_rgb_uint8` result (channels that are one plane), or ``None``."""
    if rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.strides[2] == 0:
        return rgb[:, :, 0]
    return None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    if rgba.dtype == np.uint8:
        color = rgba[:, :, :3]
    else:
        color = _minmax_uint8(rgba[:, :, :3])
        full = np.iinfo(rgba.dtype).max if np.issubdtype(rgba.dtype, np.integer) else 1.0
    out = np.empty((*rgba.shape[:2], 3), np.uint8)
    white = None
    for rows in row_blocks(rgba.shape[0], rgba.shape[1] * 8):
        if rgba.dtype == np.uint8:
            alpha = rgba[rows, :, 3]
        else:
            a = rgba[rows, :, 3].astype(np.float64)
            if not np.isfinite(a).all():
                raise InvalidImageError("image alpha channel holds NaN or Inf values")
            alpha = np.rint(np.clip(a / full, 0.0, 1.0) * 255).astype(np.uint8)
        size = (rgba.shape[1], alpha.shape[0])
        if white is None or white.size != size:
            white = Image.new("RGBA", size, (255, 255, 255, 255))
        top = Image.fromarray(np.dstack([color[rows], alpha]), "RGBA")
        out[rows] = np.asarray(Image.alpha_composite(white, top).convert("RGB"))
    return out


def _minmax_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255 and round, in row blocks (float64 per block, never for the whole image)."""
    lo = hi = None
    blocks = row_blocks(image.shape[0], int(np.prod(image.shape[1:])) * 8)
    for rows in blocks:  # min and max in the input's dtype: its conversion to float64 is monotone
        block = image[rows]
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise InvalidImageError("image holds NaN or Inf values; expected finite intensities")
        b_lo, b_hi = float(block.min()), float(block.max())
        lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    halve = not np.isfinite(hi - lo)  # a span beyond float64 (e.g. -1e308..1e308): halve everything first
    if halve:
        lo, hi = lo / 2, hi / 2
    out = np.empty(image.shape, np.uint8)
    for rows in blocks:
        data = image[rows].astype(np.float64)  # a copy: worked on in place
        if halve:
            data /= 2
        data -= lo
        data *= 255.0 / (hi - lo)
        out[rows] = np.rint(data, out=data)
        del data  # before the next block's
    return out


def resized_shape(original_size: tuple[int, int], p: Preprocessing) -> tuple[int, int]:
    """``(h, w)`` of the image after resizing, before padding (at least 1 pixel each)."""
    if p.resize == "square":
        return p.size, p.size
    h, w = original_size
    scale = p.size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_uint8(rgb: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize an ``(H, W, 3) uint8`` image to ``size = (h, w)``; uint8 ``(h, w, 3)`` result, as Pillow and OpenCV
    return.

    A grayscale image from :func:`to_rgb_uint8` (one plane seen as three channels) is resized once and its result
    repeated. Memory beyond the input: the result, one channel's copy for Pillow filters, and ``area``'s float64
    work in blocks of :data:`BLOCK_BYTES` (see :func:`medsam_rt.core.resample.apply_separable`).
    """
    plane = shared_plane(rgb)
    channels = [plane] if plane is not None else [rgb[:, :, c] for c in range(rgb.shape[2])]
    if interpolation == "area":
        rows, cols = area_matrices(size, rgb.shape[:2])
        # OpenCV's 2x2 fast path rounds halves up; elsewhere it rounds to nearest even
        halving = rgb.shape[0] == 2 * size[0] and rgb.shape[1] == 2 * size[1]
        out = []
        for ch in channels:
            x = apply_separable(ch, rows, cols, BLOCK_BYTES)
            x = np.floor(x + 0.5) if halving else np.rint(x)
            out.append(np.clip(x, 0, 255).astype(np.uint8))
    else:  # Pillow filters one band at a time with the same integer arithmetic (equal to resizing RGB)
        pil = PIL_FILTERS[interpolation]
        out = [np.asarray(Image.fromarray(np.ascontiguousarray(ch)).resize((size[1], size[0]), pil)) for ch in channels]
    if plane is not None:
        out *= 3
    return np.stack(out, axis=2)


def normalize(resized: np.ndarray, p: Preprocessing) -> np.ndarray:
    """uint8 ``(h, w, 3)`` -> float32 per ``p.normalize``."""
    if p.normalize == "minmax":
        x = resized.astype(np.float64)
        lo, hi = x.min(), x.max()
        return ((x - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    x = (resized.astype(np.float64) * p.rescale_factor).astype(np.float32)
    return (x - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)


def preprocess_image(rgb: np.ndarray, p: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """Turn an ``(H, W, 3) uint8`` image into the encoder input.

    Returns:
        ``pixel_values``: float32 ``(1, 3, pad_h, pad_w)``, and the resized
        ``(h, w)`` (the unpadded region, top-left).
    """
    h, w = resized_shape(rgb.shape[:2], p)
    x = normalize(resize_uint8(rgb, (h, w), p.interpolation), p)
    out = np.zeros((1, 3, *p.pad_size), np.float32)
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out, (h, w)


def validate_boxes(boxes: Any, original_size: tuple[int, int]) -> np.ndarray:
    """Check boxes against the image and return them as float64 ``(N, 4)``.

    Boxes are ``x0, y0, x1, y1`` in original-image pixel coordinates with
    ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``. A single box may be given
    as a flat sequence of four numbers.

    Raises:
        InvalidBoxError: wrong shape, NaN/Inf, inverted/zero-area or outside the image.
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidBoxError(f"boxes must be numbers shaped (N, 4); got {boxes!r:.80}") from None
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidBoxError(f"boxes must have shape (N, 4) as x0, y0, x1, y1; got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidBoxError("no boxes given; expected at least one box (N >= 1)")
    h, w = original_size
    for i, (x0, y0, x1, y1) in enumerate(arr):
        box = f"box {i} ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise InvalidBoxError(f"{box} holds NaN or Inf")
        if not (x1 > x0 and y1 > y0):
            raise InvalidBoxError(f"{box} is inverted or has zero area; expected x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise InvalidBoxError(f"{box} lies outside the {w}x{h} image; expected 0 <= x <= {w}, 0 <= y <= {h}")
    return arr


def scale_boxes(
    boxes: np.ndarray, original_size: tuple[int, int], resized_size: tuple[int, int], p: Preprocessing
) -> np.ndarray:
    """Map ``(N, 4)`` boxes from original pixels to the encoder-input frame; float32 ``(N, 4)``.

    ``per_axis``: x by resized_w / W and y by resized_h / H (``SamProcessor``;
    1024/W and 1024/H for a square resize). ``longest_side``: both by size / max(H, W).
    """
    (h, w), (rh, rw) = original_size, resized_size
    if p.box_scale == "longest_side":
        factors = np.full(4, p.size / max(h, w))
    else:
        factors = np.array([rw / w, rh / h, rw / w, rh / h])
    scaled = boxes * factors
    if p.box_round == "floor":
        scaled = np.floor(scaled)
    return scaled.astype(np.float32)

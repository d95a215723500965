"""Image and box preprocessing, in numpy (+ Pillow for resampling).

The recipe is *declared* by the model directory's manifest (``preprocessing``)
and parsed into :class:`Preprocessing`; nothing here is special-cased by model
name. The Hugging Face recipe mirrors ``transformers.SamImageProcessor``:

1. intake: any image becomes ``(H, W, 3) uint8`` (:func:`to_rgb_uint8`);
2. resize so the longest side is ``size`` (Pillow filter ``interpolation``),
   the new side lengths rounded half up, as ``SamImageProcessor`` does;
3. ``rescale_mean_std``: ``x * rescale_factor``, then ``(x - mean) / std``;
4. pad bottom-right with zeros to ``pad_size`` and go channels-first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidBoxError, InvalidImageError, ModelDirError

#: Pillow resampling filters by the names the manifest uses.
PIL_FILTERS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_MODES = ("longest_side",)
NORMALIZE_MODES = ("rescale_mean_std",)
POSTPROCESS_MODES = ("upscale_crop_resize",)


@dataclass(frozen=True)
class Preprocessing:
    """A preprocessing recipe as declared in a manifest (see ``docs`` / README).

    Attributes:
        resize: ``"longest_side"``: scale so max(H, W) == ``size``, keeping aspect.
        size: target length of the longest side, in pixels.
        interpolation: Pillow filter name (``"bilinear"``, ``"bicubic"``, ...).
        normalize: ``"rescale_mean_std"``: ``(x * rescale_factor - mean) / std``.
        rescale_factor: multiplier applied to the uint8 pixel values.
        image_mean, image_std: per-channel (R, G, B) statistics after rescaling.
        pad_size: ``(height, width)`` of the encoder input; padding is bottom-right zeros.
        postprocess: ``"upscale_crop_resize"``: low-res logits -> ``pad_size``
            (bilinear), crop the unpadded region, bilinear to the original size.
        mask_threshold: threshold on the logits (0.0 == probability 0.5).
    """

    resize: str
    size: int
    interpolation: str
    normalize: str
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pad_size: tuple[int, int]
    postprocess: str
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
                rescale_factor=float(data["rescale_factor"]),
                image_mean=_triple(data["image_mean"]),
                image_std=_triple(data["image_std"]),
                pad_size=(int(data["pad_size"][0]), int(data["pad_size"][1])),
                postprocess=str(data["postprocess"]),
                mask_threshold=float(data.get("mask_threshold", 0.0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelDirError(f"manifest 'preprocessing' is malformed: {exc!r}") from None
        for name, value, allowed in (
            ("resize", p.resize, RESIZE_MODES),
            ("interpolation", p.interpolation, tuple(PIL_FILTERS)),
            ("normalize", p.normalize, NORMALIZE_MODES),
            ("postprocess", p.postprocess, POSTPROCESS_MODES),
        ):
            if value not in allowed:
                raise ModelDirError(
                    f"manifest preprocessing {name}={value!r} is not supported; expected one of {allowed}"
                )
        if p.size <= 0 or min(p.pad_size) < p.size or any(s == 0 for s in p.image_std):
            raise ModelDirError(f"manifest preprocessing sizes are inconsistent: size={p.size}, pad_size={p.pad_size}")
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
        image = image.astype(np.uint8) * 255
    elif not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InvalidImageError(f"image dtype {image.dtype} is not supported; expected an integer or float dtype")
    if image.ndim == 3 and image.shape[2] == 4:
        return _composite_on_white(image)
    if image.dtype != np.uint8:
        image = _minmax_uint8(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    if rgba.dtype == np.uint8:
        color, alpha = rgba[:, :, :3], rgba[:, :, 3]
    else:
        color = _minmax_uint8(rgba[:, :, :3])
        a = rgba[:, :, 3].astype(np.float64)
        if not np.isfinite(a).all():
            raise InvalidImageError("image alpha channel holds NaN or Inf values")
        full = np.iinfo(rgba.dtype).max if np.issubdtype(rgba.dtype, np.integer) else 1.0
        alpha = np.rint(np.clip(a / full, 0.0, 1.0) * 255).astype(np.uint8)
    white = Image.new("RGBA", (rgba.shape[1], rgba.shape[0]), (255, 255, 255, 255))
    top = Image.fromarray(np.dstack([color, alpha]), "RGBA")
    return np.asarray(Image.alpha_composite(white, top).convert("RGB")).copy()


def _minmax_uint8(image: np.ndarray) -> np.ndarray:
    data = image.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        raise InvalidImageError("image holds NaN or Inf values; expected finite intensities")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def resized_shape(original_size: tuple[int, int], p: Preprocessing) -> tuple[int, int]:
    """``(h, w)`` of the image after resizing, before padding (at least 1 pixel each)."""
    h, w = original_size
    scale = p.size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def preprocess_image(rgb: np.ndarray, p: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """Turn an ``(H, W, 3) uint8`` image into the encoder input.

    Returns:
        ``pixel_values``: float32 ``(1, 3, pad_h, pad_w)``, and the resized
        ``(h, w)`` (the unpadded region, top-left).
    """
    h, w = resized_shape(rgb.shape[:2], p)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=PIL_FILTERS[p.interpolation]))
    x = (resized.astype(np.float64) * p.rescale_factor).astype(np.float32)
    x = (x - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)
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
    except (TypeError, ValueError):
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


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], resized_size: tuple[int, int]) -> np.ndarray:
    """Map ``(N, 4)`` boxes from original pixels to the encoder-input frame.

    Each axis is scaled by resized/original length, as ``SamProcessor`` does.
    Returns float32 ``(N, 4)``.
    """
    (h, w), (rh, rw) = original_size, resized_size
    factors = np.array([rw / w, rh / h, rw / w, rh / h])
    return (boxes * factors).astype(np.float32)

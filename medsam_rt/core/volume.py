"""3-D box prompts propagated through the slices of a volume, as LiteMedSAM's CVPR 2024 inference does.

The protocol (``MedSAM_infer_npz_3D`` in ``CVPR24_LiteMedSAM_infer.py``), per object with the 3-D box
``[x_min, y_min, z_min, x_max, y_max, z_max]``:

1. ``z_mid = int((z_max - z_min) / 2 + z_min)`` is segmented with the box's x/y extent (in original pixels, scaled
   to the encoder frame and truncated to integers as every 2-D box is);
2. then ``z_mid + 1 ... z_max`` upwards and ``z_mid - 1 ... z_min`` downwards (both ends inclusive), each slice
   with the bounding box of the previous slice's mask in the encoder frame (the full-size mask, holding the
   object's label value, resized like the image with OpenCV's ``INTER_AREA``, padded), grown by 3 pixels and
   clipped to the padded frame; when the previous mask is empty, the original box again;
3. the objects' masks are combined in the label volume with later objects over earlier ones (label ``k`` for the
   ``k``-th box, 1-based).

Unlike the reference, which encodes every slice again for every object, each slice is embedded once and decoded
for all the objects that reach it in one decoder call: the slices are visited in one upward sweep (every object's
``z_mid ... z_max``) and one downward sweep (every ``z_mid - 1 ... z_min``); a slice that both sweeps need is kept
from the first to the second in an :class:`~medsam_rt.core.cache.EmbeddingCache` bounded by bytes (over the budget, the
oldest are encoded again). The masks do not depend on this order: each object's chain only reads its own previous
mask, and "later objects over earlier ones" is "the largest label wins", whatever order the slices come in.

Extension (off by default, so that results match the reference): ``stop_when_empty`` ends a direction when the
previous slice's mask is empty instead of falling back to the original box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam_rt.core.cache import EmbeddingCache, default_max_bytes
from medsam_rt.core.preprocess import resized_shape, scale_boxes, validate_boxes
from medsam_rt.core.resample import area_matrices
from medsam_rt.errors import InvalidBoxError, InvalidImageError

if TYPE_CHECKING:
    from medsam_rt.core.model import MedSAM

#: Pixels the previous slice's bounding box grows by in the encoder frame (``get_bbox256``'s ``bbox_shift``).
BOX_GROWTH = 3


@dataclass(frozen=True, eq=False)
class VolumeSegmentation:
    """Labels for N 3-D boxes over a ``(D, H, W)`` volume.

    Attributes:
        labels: ``(D, H, W)`` uint8 (uint16 for more than 255 boxes): 0 background, ``k`` for the ``k``-th box,
            later boxes over earlier ones where masks overlap.
        boxes3d: float64 ``(N, 6)`` x_min, y_min, z_min, x_max, y_max, z_max as given (x, y in pixels, z slices).
        prompts: float32 ``(N, D, 4)``: the box each slice was decoded with, x0, y0, x1, y1 in the encoder's
            padded input frame (256x256 for LiteMedSAM); NaN where the object was not decoded on that slice.
        scores: float32 ``(N, D)``: the decoder's IoU estimate; NaN where not decoded.
        encoded: encoder runs (each slice once, unless evicted between the two sweeps).
        reused: slices whose embedding was kept from the upward to the downward sweep.
    """

    labels: np.ndarray
    boxes3d: np.ndarray
    prompts: np.ndarray
    scores: np.ndarray
    encoded: int
    reused: int

    def mask(self, k: int) -> np.ndarray:
        """bool ``(D, H, W)``: where label ``k`` (1-based) won."""
        return self.labels == k


def validate_boxes3d(boxes3d: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Check 3-D boxes against a ``(D, H, W)`` volume and return them as float64 ``(N, 6)``.

    A box is ``x_min, y_min, z_min, x_max, y_max, z_max``: x, y in pixels with ``0 <= x_min < x_max <= W`` and
    ``0 <= y_min < y_max <= H`` (as 2-D boxes), z slice indices (whole numbers), both ends included,
    ``0 <= z_min <= z_max <= D - 1``. The reference requires ``z_min < z_max``; one slice is accepted here.

    Raises:
        InvalidBoxError: wrong shape, NaN/Inf, fractional z, inverted or outside the volume.
    """
    try:
        arr = np.asarray(boxes3d, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InvalidBoxError(f"3-D boxes must be numbers shaped (N, 6); got {boxes3d!r:.80}") from None
    arr = arr[None, :] if arr.shape == (6,) else arr
    if arr.ndim != 2 or arr.shape[1] != 6 or len(arr) == 0:
        raise InvalidBoxError(
            f"3-D boxes must have shape (N, 6), N >= 1, as x_min, y_min, z_min, x_max, y_max, z_max; "
            f"got shape {arr.shape}"
        )
    if len(arr) > np.iinfo(np.uint16).max:
        raise InvalidBoxError(f"{len(arr)} 3-D boxes; a uint16 label volume holds at most 65535")
    d, h, w = shape
    try:
        validate_boxes(arr[:, [0, 1, 3, 4]], (h, w))
    except InvalidBoxError as exc:
        raise InvalidBoxError(f"3-D boxes (x_min, y_min, x_max, y_max): {exc}") from None
    for i, (z0, z1) in enumerate(arr[:, [2, 5]]):
        box = f"3-D box {i} ({', '.join(f'{v:g}' for v in arr[i])})"
        if not np.isfinite([z0, z1]).all() or not (float(z0).is_integer() and float(z1).is_integer()):
            raise InvalidBoxError(f"{box}: z_min and z_max must be whole slice indices")
        if not 0 <= z0 <= z1 <= d - 1:
            raise InvalidBoxError(f"{box}: expected 0 <= z_min <= z_max <= {d - 1} (slice indices, both included)")
    return arr


def segment_volume(
    model: MedSAM,
    volume: np.ndarray,
    boxes3d: Any,
    *,
    stop_when_empty: bool = False,
    cache_bytes: int | None = None,
    on_slice: Callable[[int, int], None] | None = None,
) -> VolumeSegmentation:
    """Segment objects in a volume from one 3-D box each (LiteMedSAM's CVPR24 protocol; see the module docstring).

    Args:
        model: a loaded :class:`~medsam_rt.core.model.MedSAM`.
        volume: ``(D, H, W)`` or ``(D, H, W, 3)`` slices, uint8 as in the challenge (window CT/MR values to
            uint8 first, e.g. :func:`medsam_rt.io.formats.display_range` + ``to_display``; other dtypes are min-max
            scaled per slice by :meth:`~medsam_rt.core.model.MedSAM.embed`).
        boxes3d: ``(N, 6)`` (or six numbers) x_min, y_min, z_min, x_max, y_max, z_max (see :func:`validate_boxes3d`).
        stop_when_empty: end a direction once the previous slice's mask is empty (the reference falls back to the
            original box instead).
        cache_bytes: budget for embeddings kept from the upward to the downward sweep (default
            :func:`medsam_rt.core.cache.default_max_bytes`); 0 encodes those slices twice.
        on_slice: called with ``(z, done)`` after each slice step (``done`` counts steps of both sweeps).

    Raises:
        InvalidImageError: not a ``(D, H, W[, 3])`` array.
        InvalidBoxError: malformed or out-of-volume boxes, or a box under one pixel wide in the encoder frame.
    """
    if not isinstance(volume, np.ndarray) or volume.ndim not in (3, 4) or (volume.ndim == 4 and volume.shape[3] != 3):
        got = f"shape {volume.shape}" if isinstance(volume, np.ndarray) else type(volume).__name__
        raise InvalidImageError(f"volume must be an array (D, H, W) or (D, H, W, 3); got {got}")
    if min(volume.shape[:3]) == 0:
        raise InvalidImageError(f"volume is empty: shape {volume.shape}")
    d, h, w = (int(n) for n in volume.shape[:3])
    boxes = validate_boxes3d(boxes3d, (d, h, w))
    n = len(boxes)
    p = model.preprocessing
    resized = resized_shape((h, w), p)
    first = scale_boxes(boxes[:, [0, 1, 3, 4]], (h, w), resized, p)  # the x/y extent, as every 2-D box is scaled
    for i, (x0, y0, x1, y1) in enumerate(first):
        if not (x1 > x0 and y1 > y0):
            raise InvalidBoxError(
                f"3-D box {i} is under one pixel in the model's {p.pad_size[1]}x{p.pad_size[0]} input frame "
                f"({x0:g}, {y0:g}, {x1:g}, {y1:g} there); draw a larger box"
            )
    z_lo, z_mid, z_hi = slice_ranges(boxes)
    labels = np.zeros((d, h, w), label_dtype(n))
    prompts = np.full((n, d, 4), np.nan, np.float32)
    scores = np.full((n, d), np.nan, np.float32)
    up, down = sweeps(boxes)
    both = set(up) & set(down)
    kept = EmbeddingCache(default_max_bytes() if cache_bytes is None else cache_bytes)
    counts = {"encoded": 0, "reused": 0}
    # next box per object and direction: None = the original box (its first slice, or after an empty mask)
    next_up: list[np.ndarray | None] = [None] * n
    next_down: list[np.ndarray | None] = [None] * n
    stopped_up, stopped_down = [False] * n, [False] * n

    def embedding(z: int, sweep: int):
        if sweep == 1:
            hit = kept.get(str(z))
            if hit is not None:
                counts["reused"] += 1
                return hit
        counts["encoded"] += 1
        emb = model.embed(volume[z])
        if sweep == 0 and z in both:
            kept.put(str(z), emb)
        return emb

    steps = 0
    for sweep, slices in enumerate((up, down)):
        for z in slices:
            if sweep == 0:
                active = [k for k in range(n) if z_mid[k] <= z <= z_hi[k] and not stopped_up[k]]
                pending, stopped = next_up, stopped_up
            else:
                active = [k for k in range(n) if z_lo[k] <= z < z_mid[k] and not stopped_down[k]]
                pending, stopped = next_down, stopped_down
            if active:
                frame = np.stack([first[k] if pending[k] is None else pending[k] for k in active]).astype(np.float32)
                result = model.segment(embedding(z, sweep), frame, frame="encoder")
                masks = result.masks
                plane = labels[z]
                for j, k in enumerate(active):
                    prompts[k, z], scores[k, z] = frame[j], result.scores[j]
                    box = propagated_box(masks[j], min(k + 1, 255), (h, w), resized, p.pad_size)
                    paint_label(plane, masks[j], k + 1)
                    if box is None and stop_when_empty:
                        stopped[k] = True
                    pending[k] = box
                    if sweep == 0 and z == z_mid[k]:  # the downward chain starts from z_mid's mask
                        next_down[k] = box
                        stopped_down[k] = box is None and stop_when_empty
            steps += 1
            if on_slice is not None:
                on_slice(z, steps)
    kept.clear()
    return VolumeSegmentation(labels, boxes, prompts, scores, counts["encoded"], counts["reused"])


def slice_ranges(boxes3d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int ``(N,)`` arrays ``z_min``, ``z_mid``, ``z_max`` of validated 3-D boxes; ``z_mid`` as the reference's
    ``int((z_max - z_min) / 2 + z_min)``."""
    z_lo, z_hi = boxes3d[:, 2].astype(int), boxes3d[:, 5].astype(int)
    return z_lo, ((z_hi - z_lo) / 2 + z_lo).astype(int), z_hi


def sweeps(boxes3d: np.ndarray) -> tuple[list[int], list[int]]:
    """The slices of the upward sweep (ascending: some object's ``z_mid .. z_max``) and of the downward sweep
    (descending: some object's ``z_mid - 1 .. z_min``) for validated 3-D boxes."""
    z_lo, z_mid, z_hi = slice_ranges(boxes3d)
    up = [z for z in range(int(z_mid.min()), int(z_hi.max()) + 1) if ((z_mid <= z) & (z <= z_hi)).any()]
    down = [z for z in range(int(z_mid.max()) - 1, int(z_lo.min()) - 1, -1) if ((z_lo <= z) & (z < z_mid)).any()]
    return up, down


def paint_label(plane: np.ndarray, mask: np.ndarray, label: int) -> None:
    """Write ``label`` where ``mask`` is set and the plane holds a smaller label (in place): painting every
    object this way in any order gives the reference's "later objects over earlier ones"."""
    np.copyto(plane, label, where=mask & (plane < label))


def propagated_box(
    mask: np.ndarray,
    value: int,
    original_size: tuple[int, int],
    resized_size: tuple[int, int],
    pad_size: tuple[int, int],
) -> np.ndarray | None:
    """The next slice's box from this slice's mask, in the encoder frame, as the reference derives it.

    The reference resizes the object's uint8 slice (``value`` on the mask, 0 elsewhere) with OpenCV's
    ``INTER_AREA`` to ``resized_size``, pads it to ``pad_size`` and takes the bounding box of its non-zero pixels,
    ``x_max``/``y_max`` being the last pixel's index, grown by :data:`BOX_GROWTH` and clipped to ``[0, pad]``.
    A resized pixel is non-zero when its area average rounds to at least 1, so a label value above 1 keeps
    pixels that are partly covered (the reference's boxes depend on the object's label this way; reproduced).

    Args:
        mask: bool ``(H, W)`` at the original size.
        value: the object's value in the reference's uint8 slice (its label, at most 255).
        original_size, resized_size, pad_size: ``(H, W)``, ``(h, w)`` inside the encoder input, ``(ph, pw)``.

    Returns:
        float32 ``(4,)`` x0, y0, x1, y1 in the encoder frame, or ``None`` when the resized mask is empty.
    """
    rows_any, cols_any = mask.any(axis=1), mask.any(axis=0)
    if not rows_any.any():
        return None
    r0, r1 = int(np.argmax(rows_any)), len(rows_any) - int(np.argmax(rows_any[::-1]))
    c0, c1 = int(np.argmax(cols_any)), len(cols_any) - int(np.argmax(cols_any[::-1]))
    rows, cols = area_matrices(resized_size, original_size)
    rows, cols = rows[:, r0:r1], cols[:, c0:c1]
    out_r = np.flatnonzero(rows.any(axis=1))  # resized rows/columns whose area touches the mask's bounding box
    out_c = np.flatnonzero(cols.any(axis=1))
    block = mask[r0:r1, c0:c1].astype(np.float64) * value
    averaged = rows[out_r] @ block @ cols[out_c].T
    # rounding as medsam_rt.core.preprocess.resize_uint8 (OpenCV): halves up on its 2x2 fast path, to even elsewhere
    halving = original_size[0] == 2 * resized_size[0] and original_size[1] == 2 * resized_size[1]
    nonzero = averaged >= 0.5 if halving else averaged > 0.5
    ys, xs = np.nonzero(nonzero)
    if len(ys) == 0:
        return None
    y_min, y_max = out_r[ys.min()], out_r[ys.max()]
    x_min, x_max = out_c[xs.min()], out_c[xs.max()]
    ph, pw = pad_size
    return np.array(
        [
            max(0, x_min - BOX_GROWTH),
            max(0, y_min - BOX_GROWTH),
            min(pw, x_max + BOX_GROWTH),
            min(ph, y_max + BOX_GROWTH),
        ],
        np.float32,
    )


@dataclass(frozen=True, eq=False)
class PhantomVolume:
    """A synthetic volume with known truth (validation data, as :mod:`medsam_rt.tools.samples`).

    Attributes:
        volume: uint8 ``(D, H, W)``.
        truth: ``(D, H, W)`` labels (uint8/uint16), ``k`` for the ``k``-th ellipsoid (later over earlier).
        boxes3d: float64 ``(N, 6)`` each ellipsoid's box: x, y grown by ``margin`` pixels (``x_max`` exclusive),
            z from its first to its last slice (inclusive).
        spacing: ``(z, y, x)`` voxel size in mm.
    """

    volume: np.ndarray
    truth: np.ndarray
    boxes3d: np.ndarray
    spacing: tuple[float, float, float]


def ellipsoid_phantom(
    shape: tuple[int, int, int],
    ellipsoids: list[tuple[tuple[float, float, float], tuple[float, float, float]]],
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    margin: int = 4,
    noise: float = 12.0,
    seed: int = 0,
) -> PhantomVolume:
    """Bright ellipsoids in a dimmer, noisy, smoothly varying background.

    Args:
        shape: ``(D, H, W)``.
        ellipsoids: per object ``((zc, yc, xc), (rz, ry, rx))``: centre in voxels, semi-axes in mm (the voxel
            size ``spacing`` makes them anisotropic in voxels).
        spacing: ``(z, y, x)`` mm per voxel.
        margin: pixels added around each object's x/y extent in its box.
        noise: standard deviation of the Gaussian noise, in gray levels.
    """
    d, h, w = shape
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij", sparse=True)
    background = 60.0 + 25.0 * np.sin(x / 23.0) * np.cos(y / 31.0)
    volume = np.empty(shape, np.uint8)
    truth = np.zeros(shape, label_dtype(len(ellipsoids)))
    extents: list[list[int]] = [[] for _ in ellipsoids]
    for z in range(d):  # slice by slice: memory of a few slices, whatever the depth
        image = background.copy()
        for k, ((zc, yc, xc), (rz, ry, rx)) in enumerate(ellipsoids, 1):
            r2 = (
                ((z - zc) * spacing[0] / rz) ** 2
                + ((y - yc) * spacing[1] / ry) ** 2
                + ((x - xc) * spacing[2] / rx) ** 2
            )
            inside = r2 <= 1.0
            if inside.any():
                image[inside] = 150.0 + 20.0 * (k % 4)
                truth[z][inside] = k
                ys, xs = np.nonzero(inside)
                extents[k - 1].append((z, ys.min(), ys.max(), xs.min(), xs.max()))
        volume[z] = np.clip(np.rint(image + rng.normal(0.0, noise, (h, w))), 0, 255)
    boxes = []
    for k, ext in enumerate(extents, 1):
        if not ext:
            raise ValueError(f"ellipsoid {k} lies outside the {shape} volume")
        e = np.array(ext)
        boxes.append(
            [
                max(0, e[:, 3].min() - margin),
                max(0, e[:, 1].min() - margin),
                e[:, 0].min(),
                min(w, e[:, 4].max() + 1 + margin),
                min(h, e[:, 2].max() + 1 + margin),
                e[:, 0].max(),
            ]
        )
    return PhantomVolume(volume, truth, np.array(boxes, np.float64), tuple(float(v) for v in spacing))


def label_dtype(n: int) -> np.dtype:
    """uint8 for up to 255 labels, uint16 above (up to 65535)."""
    if n > np.iinfo(np.uint16).max:
        raise InvalidBoxError(f"{n} objects; a uint16 label image holds at most 65535")
    return np.dtype(np.uint8 if n <= 255 else np.uint16)


__all__ = [
    "BOX_GROWTH",
    "PhantomVolume",
    "VolumeSegmentation",
    "ellipsoid_phantom",
    "paint_label",
    "slice_ranges",
    "sweeps",
    "label_dtype",
    "propagated_box",
    "segment_volume",
    "validate_boxes3d",
]

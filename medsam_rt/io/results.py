"""Segmenting the slices of a :class:`~medsam_rt.io.formats.Scan` and writing the masks in the format users open.

Every writer works from the masks' crops (:mod:`medsam_rt.core.masks`), so memory follows what the masks cover, not
the number of boxes times the image. Outputs, told by the extension:

- ``.png``: the label image of one slice (0 background, ``k`` for the ``k``-th box): 8-bit for up to 255 boxes,
  16-bit for up to 65535;
- ``.npy``: the ``(M, H, W)`` bool mask stack (dense by definition: ``M * H * W`` bytes on disk, written one mask
  at a time);
- ``.npz``: every mask as its crop + offset (the layout of :mod:`medsam_rt.core.masks`: ``mask_format``,
  ``image_size``, ``offsets``, ``shapes``, ``crops``) with ``scores``, ``boxes``, ``slice`` and ``label`` per
  mask; the full stack (``masks``, ``mask_format`` ``"dense"``) only on request. :func:`read_npz` reads either;
- ``.nii`` / ``.nii.gz``: a label volume (uint8, or uint16 when a slice has more than 255 boxes) with the NIfTI
  source's shape, affine and header (labels only on the segmented slices; a 2-D source gives a one-slice volume
  with its pixel spacing).

Every file is written atomically.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam_rt.core.images import atomic_write, save_png
from medsam_rt.core.masks import MaskFormatError, Masks, label_dtype
from medsam_rt.errors import OutputFormatError
from medsam_rt.io.formats import Scan, nifti_voxel_index, to_display

OUTPUT_SUFFIXES = (".png", ".npy", ".npz", ".nii", ".nii.gz")


@dataclass(frozen=True, eq=False)
class SliceResult:
    """Masks for the boxes of one slice.

    Attributes:
        index: the slice (0 for 2-D images).
        boxes: ``(N, 4)`` x0, y0, x1, y1 in the slice's pixels.
        masks: the N masks as crops (:class:`~medsam_rt.core.masks.Masks`; ``masks.dense()`` for ``(N, H, W)``).
        scores: float32 ``(N,)``.
        labels: uint8 (up to 255 boxes) or uint16 ``(H, W)``: 0 background, ``k`` for the slice's ``k``-th box;
            built from the crops on first access.
    """

    index: int
    boxes: np.ndarray
    masks: Masks
    scores: np.ndarray

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return self.masks.label_image()


@dataclass(frozen=True, eq=False)
class MaskFile:
    """What :func:`read_npz` reads from a ``.npz`` written by medsam-rt.

    Attributes:
        masks: every mask as its crop (all slices' masks share the slice size).
        scores: float32 ``(M,)``; boxes: float64 ``(M, 4)``; slice: int32 ``(M,)``; label: int32 ``(M,)`` (the
            mask's label in its slice's label image).
    """

    masks: Masks
    scores: np.ndarray
    boxes: np.ndarray
    slice: np.ndarray
    label: np.ndarray

    def dense(self) -> np.ndarray:
        """bool ``(M, H, W)``: every mask on its whole slice (``M * H * W`` bytes)."""
        return self.masks.dense()


def read_npz(path: str | os.PathLike[str]) -> MaskFile:
    """Read masks written to ``.npz`` by ``medsam-rt segment`` (crops, or the full stack when it was asked for).

    Raises:
        MaskFormatError: not such a file (missing or inconsistent arrays).
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    if "mask_format" not in arrays and "masks" in arrays:  # written before crops: the full stack
        arrays["mask_format"] = np.array("dense")
    try:
        return MaskFile(
            Masks.from_arrays(arrays),
            np.asarray(arrays["scores"], np.float32),
            np.asarray(arrays["boxes"], np.float64).reshape(-1, 4),
            np.asarray(arrays["slice"], np.int32),
            np.asarray(arrays["label"], np.int32),
        )
    except KeyError as exc:
        raise MaskFormatError(f"{path}: not a medsam-rt mask file (no {exc.args[0]!r} array)") from None


def output_suffix(path: Path) -> str:
    """The output format of ``path`` (one of :data:`OUTPUT_SUFFIXES`), or :class:`OutputFormatError`."""
    name = path.name.lower()
    for suffix in sorted(OUTPUT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise OutputFormatError(f"--out {path} must end in {', '.join(OUTPUT_SUFFIXES)}")


def check_output(path: Path, scan: Scan, num_slices: int) -> None:
    """Refuse, before any slow work, an output format that cannot hold ``num_slices`` slices of ``scan``."""
    suffix = output_suffix(path)
    if suffix == ".png" and num_slices > 1:
        raise OutputFormatError(f"--out {path}: a PNG holds one slice; use .nii.gz, .npz or .npy for {num_slices}")
    if suffix in (".nii", ".nii.gz") and scan.kind != "nifti" and scan.num_slices > 1:
        raise OutputFormatError(f"--out {path}: a NIfTI label volume needs a NIfTI source or a single slice")


def segment_scan(
    model,
    scan: Scan,
    boxes_per_slice: Mapping[int, np.ndarray],
    value_range: tuple[float, float] | None,
    on_slice: Callable[[int], None] | None = None,
    *,
    roi: bool = False,
) -> list[SliceResult]:
    """Embed each listed slice once and decode its boxes; slices in increasing order. ``roi=True``: per slice, a
    window around its boxes is embedded instead (``MedSAM.predict(roi=True)``, ``medsam-rt segment --roi``)."""
    results = []
    for index in sorted(boxes_per_slice):
        image = to_display(scan.values[index], value_range)
        result = model.predict(image, boxes_per_slice[index], roi=roi)
        results.append(SliceResult(index, result.boxes, result.crops, result.scores))
        if on_slice is not None:
            on_slice(index)
    return results


def write_result(path: Path, scan: Scan, results: list[SliceResult], *, dense_npz: bool = False) -> None:
    """Write ``results`` to ``path`` in the format its extension names (atomically); ``dense_npz``: a ``.npz``
    holds the full ``(M, H, W)`` stack instead of the crops.

    Raises:
        OutputFormatError: the format cannot hold these results.
        LabelOverflowError: a label image (``.png``, NIfTI) for a slice with more than 65535 boxes.
    """
    suffix = output_suffix(path)
    check_output(path, scan, len(results))
    if suffix == ".png":
        save_png(path, results[0].labels)
    elif suffix == ".npy":
        atomic_write(path, lambda tmp: _save_stack(tmp, scan, results))
    elif suffix == ".npz":
        masks = _all_masks(scan, results)
        arrays = {"mask_format": np.array("dense"), "masks": masks.dense()} if dense_npz else masks.to_arrays()
        arrays.update(
            scores=np.concatenate([r.scores for r in results]).astype(np.float32),
            boxes=np.concatenate([r.boxes for r in results]).reshape(-1, 4),
            slice=np.concatenate([np.full(len(r.boxes), r.index, np.int32) for r in results]),
            label=np.concatenate([np.arange(1, len(r.boxes) + 1, dtype=np.int32) for r in results]),
        )
        atomic_write(path, lambda tmp: _save_npz(tmp, arrays))
    else:
        data = _label_volume_bytes(scan, results, gz=suffix == ".nii.gz")
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _all_masks(scan: Scan, results: list[SliceResult]) -> Masks:
    return Masks(scan.image_size, tuple(c for r in results for c in r.masks))


def _save_stack(tmp: str, scan: Scan, results: list[SliceResult]) -> None:
    """The ``(M, H, W)`` bool ``.npy``, one dense mask in memory at a time."""
    masks = _all_masks(scan, results)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(bool)), "fortran_order": False}
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": (len(masks), *masks.image_size)})
        for crop in masks:
            fh.write(crop.dense(masks.image_size).tobytes())


def _save_npz(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez_compressed(fh, **arrays)


def _label_volume_bytes(scan: Scan, results: list[SliceResult], gz: bool) -> bytes:
    import nibabel

    dtype = label_dtype(max((len(r.boxes) for r in results), default=0))
    if scan.kind == "nifti":
        src = scan.source
        volume = np.zeros(src.shape[:3], dtype)
        for r in results:  # each slice's labels straight into the volume: no per-slice label image kept
            r.masks.paste_labels(volume[nifti_voxel_index(scan.axis, r.index)].T)
        volume = volume.reshape(src.shape)
        header = src.header.copy()
        header.set_data_dtype(dtype)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["cal_min"], header["cal_max"] = 0.0, float(volume.max())
        img = type(src)(volume, src.affine, header)
    else:  # one 2-D slice: voxel (i, j) = pixel (x, y), spacing from the file when known
        row, col = scan.spacing or (1.0, 1.0)
        labels = results[0].labels
        img = nibabel.Nifti1Image(labels.T[:, :, None], np.diag([col, row, 1.0, 1.0]))
        img.header.set_data_dtype(labels.dtype)
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data


def summary(scan: Scan, results: list[SliceResult]) -> dict:
    """JSON-ready description: every mask's slice, box, score, area (px; mm² when the spacing is known), and
    for volumes the per-label volume (mm³) when the slice thickness is known too."""
    pixel_mm2 = scan.spacing[0] * scan.spacing[1] if scan.spacing else None
    rows = []
    for r in results:
        for k, (box, score, area) in enumerate(zip(r.boxes, r.scores, r.masks.areas(), strict=True), 1):
            area = int(area)
            row = {"slice": r.index, "label": k, "box": [float(v) for v in box], "score": round(float(score), 4)}
            row["area_px"] = area
            if pixel_mm2 is not None:
                row["area_mm2"] = round(area * pixel_mm2, 3)
            rows.append(row)
    out: dict = {"image": os.fspath(scan.path), "kind": scan.kind, "size": list(scan.image_size), "masks": rows}
    if scan.spacing:
        out["pixel_spacing_mm"] = list(scan.spacing)
    if scan.num_slices > 1:
        out["slices"] = [r.index for r in results]
        if pixel_mm2 is not None and scan.slice_thickness:
            volumes: dict[int, float] = {}
            for row in rows:
                volumes[row["label"]] = volumes.get(row["label"], 0.0) + row["area_mm2"] * scan.slice_thickness
            out["slice_thickness_mm"] = scan.slice_thickness
            out["volume_mm3"] = {str(k): round(v, 3) for k, v in sorted(volumes.items())}
    return out


__all__ = [
    "OUTPUT_SUFFIXES",
    "MaskFile",
    "OutputFormatError",
    "SliceResult",
    "check_output",
    "output_suffix",
    "read_npz",
    "segment_scan",
    "summary",
    "write_result",
]

"""Segmenting the slices of a :class:`~medsam_rt.formats.Scan` and writing the masks in the format users open.

Outputs, told by the extension: ``.png`` 8-bit label image (one slice); ``.npy`` the ``(M, H, W)`` bool mask
stack; ``.npz`` masks + scores + boxes + slice index + label of every mask; ``.nii`` / ``.nii.gz`` a uint8 label
volume with the NIfTI source's shape, affine and header (labels only on the segmented slices; a 2-D source gives
a one-slice volume with its pixel spacing). Every file is written atomically.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MedSAMError
from .formats import Scan, nifti_voxel_index, to_display
from .io import atomic_write, save_png

OUTPUT_SUFFIXES = (".png", ".npy", ".npz", ".nii", ".nii.gz")


class OutputFormatError(MedSAMError, ValueError):
    """The output path's format cannot hold this result (e.g. a PNG for several slices)."""


@dataclass(frozen=True, eq=False)
class SliceResult:
    """Masks for the boxes of one slice.

    Attributes:
        index: the slice (0 for 2-D images).
        boxes: ``(N, 4)`` x0, y0, x1, y1 in the slice's pixels.
        masks: bool ``(N, H, W)``.
        scores: float32 ``(N,)``.
        labels: uint8 ``(H, W)``: 0 background, ``k`` for the slice's ``k``-th box.
    """

    index: int
    boxes: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


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
) -> list[SliceResult]:
    """Embed each listed slice once and decode its boxes; slices in increasing order."""
    results = []
    for index in sorted(boxes_per_slice):
        image = to_display(scan.values[index], value_range)
        result = model.segment(model.embed(image), boxes_per_slice[index])
        results.append(SliceResult(index, result.boxes, result.masks, result.scores, result.label_image()))
        if on_slice is not None:
            on_slice(index)
    return results


def write_result(path: Path, scan: Scan, results: list[SliceResult]) -> None:
    """Write ``results`` to ``path`` in the format its extension names (atomically)."""
    suffix = output_suffix(path)
    check_output(path, scan, len(results))
    if suffix == ".png":
        save_png(path, results[0].labels)
    elif suffix == ".npy":
        masks = _mask_stack(scan, results)
        atomic_write(path, lambda tmp: np.save(tmp, masks))
    elif suffix == ".npz":
        arrays = {
            "masks": _mask_stack(scan, results),
            "scores": np.concatenate([r.scores for r in results]).astype(np.float32),
            "boxes": np.concatenate([r.boxes for r in results]).reshape(-1, 4),
            "slice": np.concatenate([np.full(len(r.boxes), r.index, np.int32) for r in results]),
            "label": np.concatenate([np.arange(1, len(r.boxes) + 1, dtype=np.int32) for r in results]),
        }
        atomic_write(path, lambda tmp: _save_npz(tmp, arrays))
    else:
        data = _label_volume_bytes(scan, results, gz=suffix == ".nii.gz")
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _mask_stack(scan: Scan, results: list[SliceResult]) -> np.ndarray:
    if not any(len(r.boxes) for r in results):
        return np.zeros((0, *scan.image_size), bool)
    return np.concatenate([r.masks for r in results])


def _save_npz(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez_compressed(fh, **arrays)


def _label_volume_bytes(scan: Scan, results: list[SliceResult], gz: bool) -> bytes:
    import nibabel

    if scan.kind == "nifti":
        src = scan.source
        volume = np.zeros(src.shape[:3], np.uint8)
        for r in results:
            volume[nifti_voxel_index(scan.axis, r.index)] = r.labels.T
        volume = volume.reshape(src.shape)
        header = src.header.copy()
        header.set_data_dtype(np.uint8)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["cal_min"], header["cal_max"] = 0.0, float(volume.max())
        img = type(src)(volume, src.affine, header)
    else:  # one 2-D slice: voxel (i, j) = pixel (x, y), spacing from the file when known
        row, col = scan.spacing or (1.0, 1.0)
        img = nibabel.Nifti1Image(results[0].labels.T[:, :, None], np.diag([col, row, 1.0, 1.0]))
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data


def summary(scan: Scan, results: list[SliceResult]) -> dict:
    """JSON-ready description: every mask's slice, box, score, area (px; mm² when the spacing is known), and
    for volumes the per-label volume (mm³) when the slice thickness is known too."""
    pixel_mm2 = scan.spacing[0] * scan.spacing[1] if scan.spacing else None
    rows = []
    for r in results:
        for k, (box, score, mask) in enumerate(zip(r.boxes, r.scores, r.masks, strict=True), 1):
            area = int(mask.sum())
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
    "OutputFormatError",
    "SliceResult",
    "check_output",
    "output_suffix",
    "segment_scan",
    "summary",
    "write_result",
]

"""Writing a ``(S, H, W)`` label volume of a :class:`~medsam_rt.io.formats.Scan` where the scan lies.

Formats, by extension: ``.nii`` / ``.nii.gz`` a label volume (uint8, uint16 above 255 labels) in the source's
geometry: a NIfTI source's own grid, affine and header; a DICOM series (or multi-frame file with positions)
through its :class:`~medsam_rt.io.series.VolumeGeometry` (voxel ``(i, j, k)`` = column, row, slice; LPS turned into
NIfTI's RAS); other sources with their pixel spacing only (not placed in patient space). ``.npz``: ``segs``
(the CVPR24 key) ``(S, H, W)``, ``spacing`` ``(slice, row, column)`` mm when known, plus any extra arrays given.
``.npy``: the labels alone. Every file is written atomically.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from medsam_rt.core.images import atomic_write
from medsam_rt.errors import LabelVolumeError
from medsam_rt.io.formats import Scan, nifti_voxel_index

LABEL_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")


def label_volume_suffix(path: Path) -> str:
    """The format of ``path`` (one of :data:`LABEL_VOLUME_SUFFIXES`), or :class:`LabelVolumeError`."""
    name = path.name.lower()
    for suffix in LABEL_VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise LabelVolumeError(f"--out {path}: a label volume is written as {', '.join(LABEL_VOLUME_SUFFIXES)}")


def voxel_spacing(scan: Scan) -> tuple[float, float, float] | None:
    """``(slice, row, column)`` mm of the scan's voxels, when known."""
    if scan.geometry is not None:
        return tuple(float(v) for v in scan.geometry.spacing)  # type: ignore[return-value]
    if scan.spacing is not None and scan.slice_thickness:
        return float(scan.slice_thickness), float(scan.spacing[0]), float(scan.spacing[1])
    return None


def write_label_volume(path: Path, scan: Scan, labels: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write ``labels`` (uint8/uint16 ``(S, H, W)``, the scan's slices) to ``path`` (format by extension).

    Raises:
        LabelVolumeError: an unknown extension, or labels not shaped like the scan's slices.
    """
    suffix = label_volume_suffix(path)
    if labels.shape != (scan.num_slices, *scan.image_size):
        raise LabelVolumeError(f"labels {labels.shape} do not match the scan's {scan.num_slices} x {scan.image_size}")
    if suffix == ".npy":
        atomic_write(path, lambda tmp: np.save(tmp, labels))
    elif suffix == ".npz":
        arrays = {"segs": labels, **(extra or {})}
        spacing = voxel_spacing(scan)
        if spacing is not None:
            arrays["spacing"] = np.asarray(spacing, np.float64)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
                np.savez_compressed(fh, **arrays)

        atomic_write(path, save)
    else:
        data = nifti_bytes(scan, labels, gz=suffix == ".nii.gz")
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def nifti_bytes(scan: Scan, labels: np.ndarray, gz: bool) -> bytes:
    """The NIfTI file of ``labels`` in ``scan``'s geometry (see the module docstring)."""
    import nibabel

    if scan.kind == "nifti":
        src = scan.source
        volume = np.zeros(src.shape[:3], labels.dtype)
        for k in range(labels.shape[0]):
            volume[nifti_voxel_index(scan.axis, k)] = labels[k].T
        header = src.header.copy()
        header.set_data_dtype(labels.dtype)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["cal_min"], header["cal_max"] = 0.0, float(labels.max())
        img = type(src)(volume.reshape(src.shape), src.affine, header)
    else:
        volume = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (column, row, slice) = NIfTI (i, j, k)
        if scan.geometry is not None:
            affine = scan.geometry.affine_ras()
            img = nibabel.Nifti1Image(volume, affine)
            img.set_qform(affine, code=1)  # scanner coordinates
            img.set_sform(affine, code=1)
        else:
            spacing = voxel_spacing(scan) or (1.0, *(scan.spacing or (1.0, 1.0)))
            img = nibabel.Nifti1Image(volume, np.diag([spacing[2], spacing[1], spacing[0], 1.0]))
        img.header["cal_min"], img.header["cal_max"] = 0.0, float(labels.max())
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data


def volume_summary(scan: Scan, result) -> dict:
    """JSON-ready description of a :class:`~medsam_rt.core.volume.VolumeSegmentation` of ``scan``: per object its 3-D
    box, the slices it was decoded on, its voxels (where its label won), volume in mm³ when the voxel size is
    known, and its mean IoU estimate."""
    import os

    spacing = voxel_spacing(scan)
    voxel_mm3 = float(np.prod(spacing)) if spacing is not None else None
    counts = np.bincount(result.labels.reshape(-1), minlength=len(result.boxes3d) + 1)
    objects = []
    for k, box in enumerate(result.boxes3d):
        decoded = np.flatnonzero(np.isfinite(result.scores[k]))
        row = {
            "label": k + 1,
            "box3d": [float(v) for v in box],
            "slices": [int(decoded.min()), int(decoded.max())] if len(decoded) else [],
            "voxels": int(counts[k + 1]),
            "mean_score": round(float(np.nanmean(result.scores[k])), 4) if len(decoded) else None,
        }
        if voxel_mm3 is not None:
            row["volume_mm3"] = round(int(counts[k + 1]) * voxel_mm3, 3)
        objects.append(row)
    out = {"image": os.fspath(scan.path), "kind": scan.kind, "shape": list(result.labels.shape), "objects": objects}
    if spacing is not None:
        out["voxel_spacing_mm"] = list(spacing)
    out["encoded"], out["reused"] = result.encoded, result.reused
    return out


__all__ = [
    "LABEL_VOLUME_SUFFIXES",
    "LabelVolumeError",
    "label_volume_suffix",
    "nifti_bytes",
    "volume_summary",
    "voxel_spacing",
    "write_label_volume",
]

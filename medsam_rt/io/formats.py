"""Medical inputs: DICOM and NIfTI next to PNG/JPEG/TIFF, with their geometry, intensity windows and label outputs.

A file is read into a :class:`Scan`: its raw values (Hounsfield units after DICOM rescale, NIfTI scaled data,
or image pixels) as a stack of 2-D slices in *display order*, plus what is needed to display them (window,
percentiles) and to write results back in the source's geometry.

Display convention for volumes (documented in the README): a NIfTI volume with voxel axes ``(i, j, k)`` is
sliced along ``axis`` (default 2, ``k``); the slice's rows are the higher of the two remaining voxel axes and
its columns the lower one, e.g. for ``axis=2`` pixel ``(x, y)`` is voxel ``(i=x, j=y, k)``. This is the array
order MedSAM's reference scripts see (SimpleITK's ``(z, y, x)``); no reorientation by the affine is applied,
so boxes drawn on ``medsam-rt``'s overlays, and label volumes written back, share the file's voxel grid.

pydicom and nibabel are optional (the ``medical`` extra); they are imported only when such a file is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam_rt.core.images import read_image
from medsam_rt.core.util import one_line
from medsam_rt.errors import InvalidImageError, InvalidSliceError, InvalidWindowError, MedSAMError
from medsam_rt.io.medical import CT_WINDOWS, window

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True, eq=False)
class Scan:
    """An image or volume as read from a file.

    Attributes:
        values: ``(S, H, W)`` or ``(S, H, W, C)`` raw values in display order (``S == 1`` for 2-D images).
        kind: ``"image"`` (Pillow formats), ``"dicom"`` or ``"nifti"``.
        spacing: ``(row, column)`` pixel spacing in mm, when the file records it.
        slice_thickness: distance between slices in mm (volumes), when known.
        modality: DICOM Modality (``"CT"``, ``"MR"``, ...) when known.
        file_window: ``(level, width)`` from the file (DICOM WindowCenter/Width), when present.
        axis: NIfTI voxel axis the slices run along (``None`` for 2-D files).
        source: the nibabel image (NIfTI), kept to write label volumes with its shape, affine and header.
        geometry: where the voxels lie in patient space (:class:`~medsam_rt.io.series.VolumeGeometry`), for DICOM
            series and multi-frame files that record positions; ``None`` otherwise.
        files: a DICOM series' files in slice order (empty for single files).
    """

    values: np.ndarray
    kind: str
    path: Path
    spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    modality: str | None = None
    file_window: tuple[float, float] | None = None
    axis: int | None = None
    source: Any = field(default=None, repr=False)
    geometry: Any = None
    files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def num_slices(self) -> int:
        return int(self.values.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return int(self.values.shape[1]), int(self.values.shape[2])

    def check_slices(self, slices: range) -> range:
        """Return ``slices`` if non-empty and inside ``0..num_slices-1``; else :class:`InvalidSliceError`."""
        if len(slices) == 0 or slices.start < 0 or slices.stop > self.num_slices:
            raise InvalidSliceError(
                f"slices {slices.start}:{slices.stop} are not inside {self.path.name}'s "
                f"{self.num_slices} slice(s) (0..{self.num_slices - 1})"
            )
        return slices


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """Whether :func:`read_scan` reads ``path`` as DICOM (a ``.dcm``-like suffix or the ``DICM`` preamble)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_scan(
    path: str | os.PathLike[str], *, frame: int | None = None, axis: int = 2, series: str | None = None
) -> Scan:
    """Read a PNG/JPEG/TIFF image, a DICOM file, a folder of DICOM files (one series) or a NIfTI volume.

    Args:
        path: the file; its type is told by extension (``.nii``, ``.nii.gz``, ``.dcm``) or DICOM's preamble.
            A folder is read as a DICOM series (:func:`medsam_rt.io.series.read_series`).
        frame: for multi-frame DICOM, the 0-based frame to keep (default: all frames as slices).
        axis: for NIfTI, the voxel axis (0, 1, 2) that slices run along.
        series: for a folder, the SeriesInstanceUID to read when it holds several.

    Raises:
        InvalidImageError: missing, unreadable, undecodable (e.g. a compressed DICOM transfer syntax without
            a decoder: the syntax is named) or unsupported file; a missing optional package is named.
        InvalidSliceError: ``frame`` outside the file, or ``axis`` not 0, 1 or 2.
        SeriesError: a folder that is not one regular series (see :mod:`medsam_rt.io.series`).
    """
    path = Path(path)
    if path.is_dir():
        if frame is not None:
            raise InvalidSliceError(f"--frame applies to one multi-frame DICOM file; {path} is a folder (a series)")
        from medsam_rt.io.series import read_series

        return read_series(path, series=series)
    if not path.is_file():
        raise InvalidImageError(f"image file not found: {path}")
    if is_nifti(path):
        return _read_nifti(path, axis)
    if is_dicom(path):
        return _read_dicom(path, frame)
    if frame not in (None, 0):
        raise InvalidSliceError(f"--frame applies to multi-frame DICOM files; {path.name} is a 2-D image")
    image = read_image(path)
    return Scan(image[None], "image", path)


def _import(name: str, path: Path):
    try:
        return __import__(name)
    except ImportError:
        raise InvalidImageError(f"reading {path.name} needs {name}: pip install 'medsam-rt[medical]'") from None


def _read_dicom(path: Path, frame: int | None) -> Scan:
    pydicom = _import("pydicom", path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, struct errors, ...)
        raise InvalidImageError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from None
    try:
        return _dicom_scan(ds, path, frame)
    except MedSAMError:
        raise
    except Exception as exc:  # elements are parsed lazily: a malformed value raises ValueError, NotImplementedError...
        raise InvalidImageError(
            f"DICOM {path.name} has a malformed element: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def _dicom_scan(ds: Any, path: Path, frame: int | None) -> Scan:
    if "PixelData" not in ds:
        raise InvalidImageError(f"DICOM {path} holds no image (no PixelData)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is not None and not 0 <= frame < frames:
        raise InvalidSliceError(f"--frame {frame} is outside {path.name}'s {frames} frame(s) (0..{frames - 1})")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown"
        raise InvalidImageError(
            f"cannot decode the pixels of DICOM {path.name}: transfer syntax {name}: {one_line(exc)}"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    color = pixels.ndim == (4 if frames > 1 else 3)
    if color and photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    if frames == 1:
        pixels = pixels[None]
    if frame is not None:
        pixels = pixels[frame : frame + 1]
    values: np.ndarray = pixels
    geometry = None
    if not color:
        values, geometry = _modality_values(ds, pixels, path, frame)
        if photometric == "MONOCHROME1":  # lowest value = brightest: flip so that displays agree
            flip = float(values.max()) + float(values.min())
            values = flip - values.astype(np.float64)
    file_window = dicom_window(ds)
    if file_window is not None and not color and photometric == "MONOCHROME1":
        file_window = (flip - file_window[0], file_window[1])
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if geometry is not None:  # enhanced files keep these in their functional groups
        thickness, spacing = geometry.spacing[0], spacing or geometry.spacing[1:]
    return Scan(
        values=values,
        kind="dicom",
        path=path,
        spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        slice_thickness=float(thickness) if thickness else None,
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        file_window=file_window,
        geometry=geometry,
    )


def _modality_values(ds: Any, pixels: np.ndarray, path: Path, frame: int | None) -> tuple[np.ndarray, Any]:
    """``(F, H, W)`` stored values -> modality values, and the frames' geometry when the file records it.

    The modality LUT (``pydicom.pixels.apply_modality_lut``: Rescale Slope/Intercept or a Modality LUT Sequence)
    comes from the dataset, or per frame from an enhanced file's functional groups (Pixel Value Transformation);
    RT Dose grids are scaled by DoseGridScaling. Geometry: enhanced files' per-frame plane positions (frames in
    file order, regularly spaced), else ``None``.
    """
    from pydicom import Dataset
    from pydicom.pixels import apply_modality_lut

    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def group(i: int, name: str) -> Any:
        for item in ((per_frame[i] if i < len(per_frame) else None), shared):
            if item is not None and item.get(name):
                return item.get(name)[0]
        return None

    indices = range(pixels.shape[0]) if frame is None else [frame]
    if any(group(i, "PixelValueTransformationSequence") is not None for i in indices):
        values = np.empty(pixels.shape, np.float64)
        for j, i in enumerate(indices):
            item = group(i, "PixelValueTransformationSequence")
            lut = Dataset()
            if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
                lut.RescaleSlope, lut.RescaleIntercept = item.RescaleSlope, item.RescaleIntercept
            values[j] = apply_modality_lut(pixels[j], lut)
    else:
        values = apply_modality_lut(pixels, ds)
    if "DoseGridScaling" in ds:
        values = values.astype(np.float64) * float(ds.DoseGridScaling)
    geometry = None
    if per_frame and len(indices) > 1:
        from medsam_rt.io.series import SeriesError, dicom_vector, stack_geometry

        planes = [group(i, "PlanePositionSequence") for i in indices]
        orients = [group(i, "PlaneOrientationSequence") for i in indices]
        measures = group(0, "PixelMeasuresSequence")
        positions = [dicom_vector(p.get("ImagePositionPatient"), 3) if p is not None else None for p in planes]
        orientations = [dicom_vector(o.get("ImageOrientationPatient"), 6) if o is not None else None for o in orients]
        if all(v is not None for v in positions) and all(v is not None for v in orientations):
            spacing = dicom_vector(measures.get("PixelSpacing"), 2) if measures is not None else None
            try:
                _, geometry = stack_geometry([path] * len(indices), orientations, positions, spacing, sort=False)
            except SeriesError:  # several stacks, a cine series...: frames are still read, without geometry
                geometry = None
    return values, geometry


def dicom_window(ds) -> tuple[float, float] | None:
    """A DICOM dataset's first (WindowCenter, WindowWidth), or ``None`` (none recorded, malformed, width <= 0)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = [v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v for v in (center, width)]
    try:
        level, wide = float(first[0]), float(first[1])
    except (TypeError, ValueError):
        return None
    return (level, wide) if wide > 0 else None


def _read_nifti(path: Path, axis: int) -> Scan:
    if axis not in (0, 1, 2):
        raise InvalidSliceError(f"--axis must be 0, 1 or 2 (a NIfTI voxel axis), got {axis}")
    nibabel = _import("nibabel", path)
    try:
        img = nibabel.load(path)
        shape = img.shape
        if len(shape) > 3 and any(n != 1 for n in shape[3:]):
            raise InvalidImageError(f"{path.name} is a {len(shape)}-D NIfTI {shape}; medsam-rt reads 2-D/3-D volumes")
        data = np.asarray(img.dataobj, dtype=np.float32 if img.get_data_dtype().itemsize <= 4 else np.float64)
    except InvalidImageError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ValueError, ...
        raise InvalidImageError(f"cannot read NIfTI {path}: {type(exc).__name__}: {one_line(exc)}") from None
    data = data.reshape(shape[:3] + (1,) * (3 - len(shape[:3])))
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * 3
    rows_axis, cols_axis = sorted({0, 1, 2} - {axis}, reverse=True)
    values = np.moveaxis(data, axis, 0).transpose(0, 2, 1)  # (slices, rows = higher axis, cols = lower axis)
    return Scan(
        values=values,
        kind="nifti",
        path=path,
        spacing=(zooms[rows_axis], zooms[cols_axis]),
        slice_thickness=zooms[axis],
        axis=axis,
        source=img,
    )


def nifti_voxel_index(axis: int, k: int) -> tuple:
    """Index of slice ``k`` along ``axis`` in the voxel array (use with a transposed 2-D label slice)."""
    index: list[Any] = [slice(None)] * 3
    index[axis] = k
    return tuple(index)


# --- intensity ----------------------------------------------------------------------------------------------

WINDOW_CHOICES = ("auto", "file", "percentile", "minmax", *CT_WINDOWS)
_LEVEL_WIDTH = re.compile(r"^\s*(-?\d+(\.\d*)?)\s*,\s*(\d+(\.\d*)?)\s*$")


def parse_window(text: str) -> str | tuple[float, float]:
    """``auto``, ``file``, ``percentile``, ``minmax``, a CT preset name or ``L,W``; else InvalidWindowError."""
    if text in WINDOW_CHOICES:
        return text
    match = _LEVEL_WIDTH.match(text)
    if match:
        level, width = float(match.group(1)), float(match.group(3))
        if width > 0:
            return level, width
        raise InvalidWindowError(f"window {text!r}: the width must be > 0")
    raise InvalidWindowError(
        f"unknown window {text!r}: use one of {', '.join(WINDOW_CHOICES)} or LEVEL,WIDTH (e.g. 40,400)"
    )


def display_range(scan: Scan, spec: str | tuple[float, float] = "auto") -> tuple[float, float] | None:
    """The ``(low, high)`` value range mapped to 0..255 for ``scan``, or ``None`` to keep 8-bit images as they are.

    ``auto``: the file's window (DICOM) if present, else the soft-tissue window for CT, else the 0.5-99.5
    percentiles over the whole file for DICOM/NIfTI (MedSAM's preprocessing for MR and other modalities) and
    min-max for non-8-bit images; 8-bit images are kept. ``file`` requires a window in the file; presets and
    ``L,W`` are CT windows in the file's units (Hounsfield units after rescale).

    Raises:
        InvalidWindowError: ``file`` without a window in the file, or a window for a colour image.
    """
    values = scan.values
    color = values.ndim == 4
    if isinstance(spec, str) and spec == "auto":
        if scan.file_window is not None:
            spec = "file"
        elif scan.modality == "CT":
            spec = "soft-tissue"
        elif color or (scan.kind == "image" and values.dtype == np.uint8):
            return None  # colour (any file) and 8-bit images are shown as they are
        else:
            spec = "percentile" if scan.kind != "image" else "minmax"
    if color:
        raise InvalidWindowError(f"window {spec!r} needs a single-channel image; {scan.path.name} is colour")
    if spec == "file":
        if scan.file_window is None:
            raise InvalidWindowError(f"{scan.path.name} records no WindowCenter/WindowWidth; use another --window")
        level, width = scan.file_window
    elif spec == "percentile":
        lo, hi = np.percentile(values, [0.5, 99.5])
        return float(lo), float(hi)
    elif spec == "minmax":
        return float(values.min()), float(values.max())
    elif isinstance(spec, str):
        level, width = CT_WINDOWS[spec]
    else:
        level, width = spec
    return level - width / 2.0, level + width / 2.0


def to_display(values: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map one slice to uint8 with ``value_range`` (``None``: keep it, it is 8-bit already)."""
    if value_range is None:
        return values
    lo, hi = value_range
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    return window(values, (lo + hi) / 2.0, hi - lo)


__all__ = [
    "InvalidSliceError",
    "InvalidWindowError",
    "Scan",
    "WINDOW_CHOICES",
    "display_range",
    "parse_window",
    "read_scan",
    "to_display",
]

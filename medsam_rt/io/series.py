"""DICOM series: a folder (or a list) of single-slice files read as one volume, with its geometry.

What is checked, in order:

1. every file is DICOM (in a folder, files that are not DICOM at all, such as a README, are skipped; a file that
   claims to be DICOM and cannot be read is an error naming it);
2. the files are grouped by SeriesInstanceUID; several series and no ``series=`` choice is an error listing
   each series (UID, modality, description, number of files);
3. every slice has the same size, orientation (ImageOrientationPatient) and pixel spacing; a file that differs
   is named;
4. the slices are ordered by their position along the slice normal (ImagePositionPatient · (row × column
   direction)); positions must lie on one line along the normal (no gantry tilt), with no two at one position
   (a duplicate) and a constant step (a gap: a missing slice). Without positions, InstanceNumber orders them and
   the step comes from SpacingBetweenSlices or SliceThickness (no geometry is then known);
5. each file's stored values go through its modality LUT (``pydicom.pixels.apply_modality_lut``: Rescale
   Slope/Intercept or a Modality LUT Sequence), so CT values are Hounsfield units.

The volume is ``(S, H, W)`` in display order: slice ``s`` is the ``s``-th along the normal, rows and columns as
stored. Its :class:`VolumeGeometry` maps voxel ``(x = column, y = row, s)`` to patient coordinates (LPS, mm), so
label volumes written from it land where the scan is.

pydicom is the reader (the ``medical`` extra): it is already how medsam-rt reads single DICOM files, it exposes
every attribute the checks above need, and it is pure Python. SimpleITK/ITK's GDCM series reader sorts and
stacks too, but it is a large compiled dependency, fills gaps by interpolating or silently takes the first of
several series unless told otherwise, and reports problems as warnings; the checks here are errors that name
the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam_rt.core.util import one_line
from medsam_rt.errors import InvalidImageError, SeriesError

#: Relative tolerance of equal slice steps, orientations and spacings (positions carry rounding noise).
TOLERANCE = 1e-2
#: Absolute tolerance in mm (or direction cosine units).
ABS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of an ``(S, H, W)`` volume lie in patient space (DICOM LPS, millimetres).

    Attributes:
        origin: ``(3,)`` position of the centre of voxel (column 0, row 0, slice 0).
        spacing: ``(slice, row, column)`` step in mm: between slices, between rows (PixelSpacing[0]) and between
            columns (PixelSpacing[1]).
        direction: ``3x3`` rows are unit vectors in LPS: along a row (column index grows: the first half of
            ImageOrientationPatient), down a column (row index grows: its second half) and the slice normal
            (slice index grows).
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

    def affine_lps(self) -> np.ndarray:
        """float64 ``(4, 4)``: voxel ``(x = column, y = row, s = slice, 1)`` -> LPS mm."""
        d = np.asarray(self.direction, np.float64)
        s_slice, s_row, s_col = self.spacing
        affine = np.eye(4)
        affine[:3, 0] = d[0] * s_col
        affine[:3, 1] = d[1] * s_row
        affine[:3, 2] = d[2] * s_slice
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """float64 ``(4, 4)``: voxel ``(x, y, s, 1)`` -> RAS mm (NIfTI's world frame: LPS with x, y negated)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: its UID, modality, description and files (unsorted)."""

    uid: str
    modality: str
    description: str
    files: tuple[Path, ...] = field(repr=False)

    def describe(self) -> str:
        text = f"{self.uid} ({self.modality or '?'}"
        if self.description:
            text += f", {self.description!r}"
        return text + f", {len(self.files)} file{'s' if len(self.files) != 1 else ''})"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise InvalidImageError("reading DICOM series needs pydicom: pip install 'medsam-rt[medical]'") from None
    return pydicom


def _candidates(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[list[Path], bool]:
    """(files, from_folder): a folder's regular files (sorted, hidden ones and DICOMDIR skipped) or the list."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InvalidImageError(f"DICOM series folder not found: {folder}")
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR"
        )
        if not files:
            raise InvalidImageError(f"DICOM series folder {folder} holds no files")
        return files, True
    files = [Path(p) for p in source]
    if not files:
        raise InvalidImageError("no DICOM files given")
    for p in files:
        if not p.is_file():
            raise InvalidImageError(f"DICOM file not found: {p}")
    return files, False


def _read_headers(files: Iterable[Path], from_folder: bool) -> list[tuple[Path, Any]]:
    pydicom = _pydicom()
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not from_folder)
        except pydicom.errors.InvalidDicomError:
            if from_folder and path.suffix.lower() not in (".dcm", ".dicom"):
                continue  # not DICOM at all (no preamble): a README or similar beside the slices
            raise InvalidImageError(f"{path} is not a DICOM file") from None
        except Exception as exc:  # truncated files, malformed elements: pydicom raises many types
            raise InvalidImageError(f"cannot read DICOM {path}: {type(exc).__name__}: {one_line(exc)}") from None
        headers.append((path, ds))
    if not headers:
        raise InvalidImageError(f"no DICOM file among {len(list(files))} file(s)")
    return headers


def list_series(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[SeriesInfo]:
    """The series in a folder (or list of files), largest first.

    Raises:
        InvalidImageError: no folder, no DICOM file, or a DICOM file that cannot be read (named).
    """
    files, from_folder = _candidates(source)
    return _group(_read_headers(files, from_folder))[0]


def _group(headers: list[tuple[Path, Any]]) -> tuple[list[SeriesInfo], dict[str, list[tuple[Path, Any]]]]:
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
    infos = [
        SeriesInfo(
            uid,
            str(members[0][1].get("Modality", "") or ""),
            str(members[0][1].get("SeriesDescription", "") or ""),
            tuple(p for p, _ in members),
        )
        for uid, members in groups.items()
    ]
    infos.sort(key=lambda s: (-len(s.files), s.uid))
    return infos, groups


def read_series(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    series: str | None = None,
):
    """Read a DICOM series from a folder or a list of files into a :class:`~medsam_rt.io.formats.Scan`.

    Args:
        source: a folder of DICOM files or a list of file paths.
        series: the SeriesInstanceUID to read when the files hold several series.

    Returns:
        A ``Scan`` of kind ``"dicom"``: ``values`` float32 ``(S, H, W)`` after the modality LUT, slices along the
        normal; ``geometry`` (:class:`VolumeGeometry`, ``None`` when the files carry no positions), ``files``
        in slice order, ``spacing`` ``(row, column)`` and ``slice_thickness`` (the step between slices) in mm.
        A series of one multi-frame file (e.g. enhanced CT/MR) is read as that file's frames.

    Raises:
        SeriesError: several series without ``series`` (they are listed), ``series`` not among them, mixed
            sizes or orientations, gantry tilt, a duplicate or a missing slice (the files are named).
        InvalidImageError: no DICOM file, an unreadable or undecodable file, or a missing optional package.
    """
    files, from_folder = _candidates(source)
    infos, groups = _group(_read_headers(files, from_folder))
    where = f"{source}" if from_folder else f"the {len(files)} files given"
    if series is None:
        if len(infos) > 1:
            listed = "; ".join(s.describe() for s in infos)
            raise SeriesError(f"{where} holds {len(infos)} series: {listed}; choose one with --series UID")
        chosen = infos[0]
    else:
        matches = [s for s in infos if s.uid == series]
        if not matches:
            listed = "; ".join(s.describe() for s in infos)
            raise SeriesError(f"series {series} is not in {where}; it holds: {listed}")
        chosen = matches[0]
    members = groups[chosen.uid]
    if len(members) == 1:
        from medsam_rt.io.formats import read_scan  # one file: single slice or multi-frame, read as such

        return read_scan(members[0][0])
    return _stack(members)


def dicom_vector(value: Any, n: int) -> np.ndarray | None:
    """A DICOM multi-value of ``n`` finite numbers as float64 ``(n,)``, else ``None``."""
    try:
        arr = np.array([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - b) <= ABS_TOLERANCE + TOLERANCE * np.abs(b)))


def _names(paths: Iterable[Path], limit: int = 6) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _stack(members: list[tuple[Path, Any]]):
    from medsam_rt.io.formats import Scan

    first_path, first = members[0]
    for path, ds in members:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError(f"{path.name} is a multi-frame file inside a {len(members)}-file series; read it alone")
    sizes: dict[tuple[int, int], list[Path]] = {}
    for path, ds in members:
        sizes.setdefault((int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)), []).append(path)
    if len(sizes) > 1:
        parts = "; ".join(f"{r}x{c}: {_names(ps)}" for (r, c), ps in sizes.items())
        raise SeriesError(f"the series' slices differ in size (rows x columns): {parts}")
    orientations = [dicom_vector(ds.get("ImageOrientationPatient"), 6) for _, ds in members]
    positions = [dicom_vector(ds.get("ImagePositionPatient"), 3) for _, ds in members]
    spacing = dicom_vector(first.get("PixelSpacing"), 2)
    if spacing is not None:
        odd = [
            p for p, ds in members if (s := dicom_vector(ds.get("PixelSpacing"), 2)) is None or not _close(s, spacing)
        ]
        if odd:
            raise SeriesError(
                f"pixel spacing differs within the series: {first_path.name} has {list(spacing)} mm, but "
                f"{_names(odd)} differ"
            )
    geometry = None
    if all(o is not None for o in orientations) and all(p is not None for p in positions):
        order, geometry = stack_geometry(
            [p for p, _ in members],
            orientations,
            positions,
            spacing,
            sort=True,  # type: ignore[arg-type]
        )
        members = [members[i] for i in order]
        thickness = geometry.spacing[0]
    else:
        numbers = [ds.get("InstanceNumber") for _, ds in members]
        if any(n is None for n in numbers):
            lacking = [p for (p, _), n in zip(members, numbers, strict=True) if n is None]
            raise SeriesError(
                f"cannot order the series: {_names(lacking)} lack ImagePositionPatient/ImageOrientationPatient "
                "and InstanceNumber"
            )
        order = np.argsort([int(n) for n in numbers], kind="stable")
        members = [members[i] for i in order]
        sorted_numbers = [int(numbers[i]) for i in order]
        for i in range(len(sorted_numbers) - 1):
            if sorted_numbers[i] == sorted_numbers[i + 1]:
                raise SeriesError(
                    f"duplicate InstanceNumber {sorted_numbers[i]}: {members[i][0].name} and {members[i + 1][0].name}"
                )
        gap = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        thickness = float(gap) if gap else None
    values, photometric = _pixels(members)
    if photometric == "MONOCHROME1":  # lowest value = brightest, flipped over the whole series
        flip = float(values.max()) + float(values.min())
        values = flip - values
    from medsam_rt.io.formats import dicom_window

    file_window = dicom_window(first)
    if file_window is not None and photometric == "MONOCHROME1":
        file_window = (flip - file_window[0], file_window[1])
    return Scan(
        values=values,
        kind="dicom",
        path=members[0][0].parent,
        spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        slice_thickness=thickness,
        modality=str(first.get("Modality")) if first.get("Modality") else None,
        file_window=file_window,
        geometry=geometry,
        files=tuple(p for p, _ in members),
    )


def stack_geometry(
    names: Sequence[Path],
    orientations: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    pixel_spacing: np.ndarray | None,
    *,
    sort: bool,
) -> tuple[np.ndarray, VolumeGeometry]:
    """Order and geometry of a stack of slices (files of a series, or frames of a multi-frame file).

    Args:
        names: each slice's file (named in errors).
        orientations: each slice's ImageOrientationPatient ``(6,)``; positions: ImagePositionPatient ``(3,)``.
        pixel_spacing: ``(row, column)`` mm, or ``None`` (1 mm is assumed).
        sort: order the slices along the normal (a series); otherwise keep their order (frames), which must then
            run monotonically along the normal (the slice axis points the way they run).

    Returns:
        The slice order (indices into the inputs) and the geometry.

    Raises:
        SeriesError: mixed orientations, a duplicate position, an uneven step (a gap), positions off the normal
            (gantry tilt), or (``sort=False``) slices not in order along the normal.
    """
    iop = orientations[0]
    odd = [p for p, o in zip(names, orientations, strict=True) if not _close(o, iop)]
    if odd:
        raise SeriesError(
            f"mixed orientations: {names[0].name} has ImageOrientationPatient {[round(v, 4) for v in iop]}, "
            f"but {_names(odd)} differ"
        )
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    along = np.array([float(p @ normal) for p in positions])
    if sort:
        order = np.argsort(along, kind="stable")
    else:
        order = np.arange(len(along))
        if len(along) > 1 and along[-1] < along[0]:  # frames running against the normal: the slice axis flips
            normal, along = -normal, -along
        if np.any(np.diff(along) < -ABS_TOLERANCE):
            raise SeriesError(f"the frames of {names[0].name} are not in order along their normal")
    ordered = [names[i] for i in order]
    pos = np.array([positions[i] for i in order])
    along = along[order]
    steps = np.diff(along)
    for i, step in enumerate(steps):
        if step <= ABS_TOLERANCE:
            raise SeriesError(
                f"duplicate slice position {along[i]:.3f} mm along the normal: {ordered[i].name} and "
                f"{ordered[i + 1].name}"
            )
    step = float(np.median(steps)) if len(steps) else 1.0
    for i, s in enumerate(steps):
        if abs(s - step) > ABS_TOLERANCE + TOLERANCE * step:
            missing = round(s / step) - 1
            hint = f" ({missing} missing slice{'s' if missing != 1 else ''}?)" if missing >= 1 else ""
            raise SeriesError(
                f"uneven slice spacing: {s:.3f} mm between {ordered[i].name} and {ordered[i + 1].name}, "
                f"{step:.3f} mm elsewhere{hint}"
            )
    drift = np.abs(pos - pos[0] - np.outer(along - along[0], normal))  # sideways movement of the slices
    if drift.max() > ABS_TOLERANCE + TOLERANCE * step:
        raise SeriesError(
            f"the slices' positions do not lie along their normal (gantry tilt or a sheared stack: up to "
            f"{drift.max():.2f} mm sideways, at {ordered[int(drift.max(1).argmax())].name})"
        )
    row_mm, col_mm = (float(pixel_spacing[0]), float(pixel_spacing[1])) if pixel_spacing is not None else (1.0, 1.0)
    geometry = VolumeGeometry(
        origin=(float(pos[0][0]), float(pos[0][1]), float(pos[0][2])),
        spacing=(step, row_mm, col_mm),
        direction=(_triple(row_dir), _triple(col_dir), _triple(normal)),
    )
    return order, geometry


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


def _pixels(members: list[tuple[Path, Any]]) -> tuple[np.ndarray, str]:
    """float32 ``(S, H, W)``: each file's pixels through its own modality LUT; and the photometric interpretation."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    first = members[0][1]
    rows, cols = int(first.Rows), int(first.Columns)
    values = np.empty((len(members), rows, cols), np.float32)
    photometric = str(first.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    for i, (path, _) in enumerate(members):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            syntax = getattr(getattr(locals().get("ds"), "file_meta", None), "TransferSyntaxUID", None)
            name = f" (transfer syntax {syntax.name}, {syntax})" if syntax is not None else ""
            raise InvalidImageError(f"cannot decode the pixels of DICOM {path.name}{name}: {one_line(exc)}") from None
        if pixels.ndim != 2:
            raise SeriesError(
                f"{path.name} is not a single-channel slice (pixels {pixels.shape}); colour series are not read"
            )
        if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() != photometric:
            raise SeriesError(
                f"{path.name} is {ds.get('PhotometricInterpretation')}, the series' first file {photometric}"
            )
        values[i] = apply_modality_lut(pixels, ds)
    return values, photometric


__all__ = ["SeriesError", "SeriesInfo", "VolumeGeometry", "list_series", "read_series"]

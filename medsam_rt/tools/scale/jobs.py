"""Batch jobs: reading a job list, running one job with the functions ``medsam-rt segment`` and ``challenge`` use.

A job list is a JSONL file (one job a line) or a folder of CVPR24 npz cases. A JSONL line is an object:

- ``"image"``: the input, relative to the JSONL file's folder unless absolute: PNG/JPEG/TIFF, DICOM file or a
  folder of DICOM files (one series), NIfTI (``.nii``, ``.nii.gz``), or a CVPR24 case (``.npz``, its boxes inside);
- ``"boxes"``: ``[[x0, y0, x1, y1], ...]`` in the slice's pixels (as ``segment --box``) → ``OUT_DIR/<id>.png``, the
  label image of one slice (``"slice"`` picks it in a volume or multi-frame DICOM);
- or ``"boxes3d"``: ``[[x0, y0, z0, x1, y1, z1], ...]`` (as ``segment --box3d``) → ``OUT_DIR/<id>.nii.gz``;
- optional ``"id"`` (default: the file name without its extension), ``"window"`` (``segment --window``, default
  ``auto``), ``"slice"``, ``"axis"`` (NIfTI slice axis, default 2), ``"series"`` (a folder's SeriesInstanceUID).

A case (``.npz``) writes ``OUT_DIR/<its file name>`` with ``segs``, as ``medsam-rt challenge``. Lines that cannot
be jobs (not JSON, unknown keys, missing boxes, an id that is not a plain file name) become jobs with a
``problem``: reported as failures without running.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam_rt.errors import JobError, JobListError
from medsam_rt.io.challenge import run_case
from medsam_rt.io.formats import InvalidSliceError, display_range, parse_window, read_scan, to_display
from medsam_rt.io.labelvolume import write_label_volume
from medsam_rt.io.results import check_output, segment_scan, write_result

#: The keys a JSONL job may have.
JOB_KEYS = ("id", "image", "boxes", "boxes3d", "window", "slice", "axis", "series")
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
_NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Job:
    """One unit of batch work.

    Attributes:
        id: names the output and the job in reports.
        kind: ``"image"`` (2-D boxes, one slice → label image PNG), ``"volume"`` (3-D boxes → NIfTI label volume)
            or ``"case"`` (a CVPR24 npz case → npz with ``segs``).
        image: the input path.
        boxes: ``(N, 4)`` x0, y0, x1, y1 (image jobs) or ``(N, 6)`` x0, y0, z0, x1, y1, z1 (volume jobs), in the
            slice's pixels and slice indices; empty for cases (their boxes are in the file).
        window, slice, axis, series: as ``medsam-rt segment``'s options.
        line: the JSONL line (1-based), ``None`` for a folder's cases.
        problem: why this entry cannot run (it is reported as failed), ``None`` for a valid job.
    """

    id: str
    kind: str
    image: str
    boxes: tuple[tuple[float, ...], ...] = ()
    window: str = "auto"
    slice: int | None = None
    axis: int = 2
    series: str | None = None
    line: int | None = None
    problem: str | None = None

    @property
    def output_name(self) -> str:
        """The file this job writes in the output folder."""
        if self.kind == "case":
            return Path(self.image).name
        return f"{self.id}.nii.gz" if self.kind == "volume" else f"{self.id}.png"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        boxes = tuple(tuple(float(v) for v in b) for b in data.get("boxes", ()))
        return cls(**{**data, "boxes": boxes})


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job.

    Attributes:
        id, output: the job's id and output file name (in the output folder).
        status: ``"ok"``, ``"failed"`` or ``"skipped"`` (its output existed: resume).
        error: the failure's one-line message.
        seconds: wall time of the job in its worker.
        stages: seconds per stage: ``read`` (file to display values), ``model`` (encoder + decoder +
            masks, inside :class:`~medsam_rt.MedSAM`), ``write``; a case's reading and writing together is ``io``.
        worker: the process id that ran it.
    """

    id: str
    output: str
    status: str
    error: str | None = None
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    worker: int | None = None
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobOutcome:
        return cls(**data)


def read_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """The jobs of a JSONL file or of a folder of CVPR24 npz cases (sorted by name).

    Raises:
        JobListError: no such file or folder, no job in it, or two jobs with the same output file.
    """
    path = Path(path)
    if path.is_dir():
        jobs = [Job(p.name[: -len(".npz")], "case", os.fspath(p)) for p in sorted(path.glob("*.npz"))]
        if not jobs:
            raise JobListError(f"job folder {path} holds no .npz case")
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JobListError(f"cannot read job list {path}: {exc}") from None
        base = path.resolve().parent
        jobs = [parse_job(line, number, base) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not jobs:
            raise JobListError(f"job list {path} holds no job (one JSON object a line)")
    else:
        raise JobListError(f"job list not found: {path} (a JSONL file or a folder of .npz cases)")
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.output_name, job)
        if other is not job and job.problem is None and other.problem is None:
            where = lambda j: f"line {j.line}" if j.line else j.image  # noqa: E731
            raise JobListError(
                f'jobs at {where(other)} and {where(job)} both write {job.output_name}: give them distinct "id"s'
            )
    return jobs


def parse_job(line: str, number: int, base: Path) -> Job:
    """One JSONL line as a :class:`Job` (a malformed line gives a job with its ``problem``)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return Job(f"line-{number}", "image", "", line=number, problem=f"line {number} is not JSON: {exc}")
    if not isinstance(data, dict):
        return Job(f"line-{number}", "image", "", line=number, problem=f"line {number} is not a JSON object")
    image = data.get("image")
    fallback = Path(image).name.split(".")[0] if isinstance(image, str) and image else f"line-{number}"
    job_id = data.get("id", fallback)
    try:
        return _job(data, number, base)
    except JobError as exc:
        return Job(str(job_id), "image", str(image or ""), line=number, problem=f"line {number}: {exc}")


def _job(data: dict, number: int, base: Path) -> Job:
    unknown = sorted(set(data) - set(JOB_KEYS))
    if unknown:
        raise JobError(f"unknown key(s) {', '.join(map(repr, unknown))}; a job has {', '.join(JOB_KEYS)}")
    image = data.get("image")
    if not isinstance(image, str) or not image:
        raise JobError('"image" (a path) is missing')
    path = Path(image) if Path(image).is_absolute() else base / image
    is_case = path.name.lower().endswith(".npz")
    given = [k for k in ("boxes", "boxes3d") if k in data]
    if is_case:
        extra = sorted(set(data) - {"id", "image"})
        if extra:
            raise JobError(f"{path.name} is a CVPR24 case (its boxes are in the file): drop {', '.join(extra)}")
        kind, boxes = "case", ()
    elif len(given) != 1:
        raise JobError('give "boxes" ([[x0, y0, x1, y1], ...]) or "boxes3d" ([[x0, y0, z0, x1, y1, z1], ...])')
    else:
        kind = "image" if given[0] == "boxes" else "volume"
        boxes = _boxes(data[given[0]], 4 if kind == "image" else 6, given[0])
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    job_id = data.get("id", stem if is_case or path.suffix else path.name)
    if not isinstance(job_id, str) or not _PLAIN_ID.match(job_id) or job_id in (".", ".."):
        raise JobError(f'"id" {job_id!r} must be a plain file name (letters, digits, . _ + -; no folders)')
    window = data.get("window", "auto")
    if not isinstance(window, str):
        raise JobError(f'"window" must be a string such as "soft-tissue" or "40,400"; got {window!r}')
    slice_ = data.get("slice")
    if slice_ is not None and (kind != "image" or not isinstance(slice_, int) or isinstance(slice_, bool)):
        raise JobError(f'"slice" must be a slice index (an integer) of a job with "boxes"; got {slice_!r}')
    axis = data.get("axis", 2)
    if axis not in (0, 1, 2) or isinstance(axis, bool):
        raise JobError(f'"axis" must be 0, 1 or 2; got {axis!r}')
    series = data.get("series")
    if series is not None and not isinstance(series, str):
        raise JobError(f'"series" must be a SeriesInstanceUID string; got {series!r}')
    return Job(job_id, kind, os.fspath(path), boxes, window, slice_, axis, series, number)


def _boxes(value: Any, width: int, key: str) -> tuple[tuple[float, ...], ...]:
    """A list of boxes of ``width`` finite numbers (their geometry is checked against the image when it runs)."""
    names = "x0, y0, x1, y1" if width == 4 else "x0, y0, z0, x1, y1, z1"
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        value = [value]  # one box given flat
    ok = isinstance(value, list) and value
    ok = ok and all(isinstance(b, list) and len(b) == width for b in value)
    numbers = [v for b in value for v in b] if ok else []
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
    if not ok:
        raise JobError(f'"{key}" must be a non-empty list of [{names}] (finite numbers); got {json.dumps(value):.80}')
    return tuple(tuple(float(v) for v in b) for b in value)


class _TimedModel:
    """A :class:`~medsam_rt.MedSAM` whose ``embed``, ``segment`` and ``segment_volume`` add their seconds up."""

    def __init__(self, model) -> None:
        self._model = model
        self.seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def _timed(self, method: str, *args, **kwargs):
        start = time.perf_counter()
        try:
            return getattr(self._model, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def embed(self, *args, **kwargs):
        return self._timed("embed", *args, **kwargs)

    def segment(self, *args, **kwargs):
        return self._timed("segment", *args, **kwargs)

    def segment_volume(self, *args, **kwargs):
        return self._timed("segment_volume", *args, **kwargs)


def run_job(model, job: Job, out_dir: Path) -> dict[str, float]:
    """Run one valid job with a loaded :class:`~medsam_rt.MedSAM` and write its output (atomically) into
    ``out_dir``; returns the seconds per stage (see :class:`JobOutcome`).

    Image jobs run as ``medsam-rt segment IMAGE --box ... [--slice K] --out ID.png``, volume jobs as
    ``segment IMAGE --box3d ... --out ID.nii.gz``, cases as ``medsam-rt challenge`` runs each case.

    Raises:
        MedSAMError (and OSError) subclasses naming what was wrong with the input: unreadable file, bad box,
        slice outside the volume, unusable window.
    """
    timed = _TimedModel(model)
    start = time.perf_counter()
    if job.kind == "case":
        run_case(timed, Path(job.image), out_dir)
        return {"model": timed.seconds, "io": time.perf_counter() - start - timed.seconds}
    window = parse_window(job.window)
    scan = read_scan(job.image, axis=job.axis, series=job.series)
    value_range = display_range(scan, window)
    out = out_dir / job.output_name
    if job.kind == "image":
        if job.slice is not None:
            index = scan.check_slices(range(job.slice, job.slice + 1)).start
        elif scan.num_slices == 1:
            index = 0
        else:
            raise InvalidSliceError(
                f'{Path(job.image).name} has {scan.num_slices} slices: give "slice" (or "boxes3d" for the volume)'
            )
        check_output(out, scan, 1)
        read = time.perf_counter() - start
        results = segment_scan(timed, scan, {index: np.asarray(job.boxes)}, value_range)
        segmented = time.perf_counter()
        write_result(out, scan, results)
    else:
        if scan.values.ndim != 3:
            raise JobError(f'"boxes3d" needs a gray-level volume; {Path(job.image).name} has {scan.values.shape}')
        volume = np.stack([to_display(scan.values[k], value_range) for k in range(scan.num_slices)])
        read = time.perf_counter() - start
        result = timed.segment_volume(volume, np.asarray(job.boxes))
        segmented = time.perf_counter()
        write_label_volume(out, scan, result.labels)
    end = time.perf_counter()
    return {"read": read, "model": timed.seconds, "write": end - segmented}


__all__ = ["JOB_KEYS", "Job", "JobError", "JobListError", "JobOutcome", "parse_job", "read_jobs", "run_job"]

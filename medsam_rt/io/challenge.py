"""Running a folder of CVPR 2024 "MedSAM on laptop" cases as the challenge does.

A case is an npz file. Names starting with ``3D`` are volumes: ``imgs`` uint8 ``(D, H, W)``, ``boxes`` ``(N, 6)``
``[x_min, y_min, z_min, x_max, y_max, z_max]``, ``spacing``; they are segmented with
:func:`medsam_rt.core.volume.segment_volume` (the reference's ``MedSAM_infer_npz_3D``). Others are 2-D: ``imgs`` uint8
``(H, W, 3)``, ``boxes`` ``(N, 4)`` x0, y0, x1, y1: one embedding, every box decoded (``MedSAM_infer_npz_2D``).
Each writes ``OUTPUT_DIR/<same name>`` with ``segs`` (same height/width/depth; label ``k`` for the ``k``-th box,
later boxes over earlier ones; uint8, uint16 above 255 boxes), and ``efficiency.csv`` lists each case's seconds
(the reference's ``case,time`` columns first).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsam_rt.core.images import atomic_write
from medsam_rt.core.volume import label_dtype, paint_label
from medsam_rt.errors import ChallengeError

if TYPE_CHECKING:
    from medsam_rt.core.model import MedSAM

#: The per-case time table's file name (as the reference's).
TIMES_FILE = "efficiency.csv"


@dataclass(frozen=True)
class CaseRun:
    """One case: its name, ``"2D"``/``"3D"``, objects (boxes), encoder runs, decoded slices and seconds
    (reading the npz to writing the result)."""

    case: str
    kind: str
    objects: int
    encoded: int
    decoded_slices: int
    seconds: float


def _load_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        imgs, boxes = np.asarray(data["imgs"]), np.asarray(data["boxes"])
    except KeyError as exc:
        raise ChallengeError(f"case {path.name} lacks the array {exc}") from None
    except Exception as exc:  # zip, format and pickle errors
        raise ChallengeError(f"cannot read case {path}: {type(exc).__name__}: {exc}") from None
    return imgs, boxes


def run_case(model: MedSAM, path: Path, output_dir: Path, *, stop_when_empty: bool = False) -> CaseRun:
    """Segment one case file and write ``output_dir/<name>`` (``segs``).

    Raises:
        ChallengeError: unreadable case or missing array; InvalidImageError / InvalidBoxError from the model.
    """
    start = time.perf_counter()
    imgs, boxes = _load_case(path)
    if path.name.startswith("3D"):
        result = model.segment_volume(imgs, boxes, stop_when_empty=stop_when_empty)
        segs = result.labels
        kind, encoded, decoded = "3D", result.encoded, int(np.isfinite(result.scores).any(axis=0).sum())
    else:
        seg = model.segment(model.embed(imgs), boxes)
        masks = seg.masks
        segs = np.zeros(masks.shape[1:], label_dtype(len(masks)))
        for k in range(len(masks)):
            paint_label(segs, masks[k], k + 1)
        kind, encoded, decoded = "2D", 1, 1

    def save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, segs=segs)

    atomic_write(output_dir / path.name, save)
    return CaseRun(path.name, kind, int(len(np.atleast_2d(boxes))), encoded, decoded, time.perf_counter() - start)


def run_challenge(
    model: MedSAM,
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    stop_when_empty: bool = False,
    on_case: Callable[[CaseRun], None] | None = None,
) -> list[CaseRun]:
    """Segment every ``INPUT_DIR/*.npz`` case (sorted by name) into ``OUTPUT_DIR`` and write its time table.

    Raises:
        ChallengeError: no input folder or no case in it, an output path that is not a folder, or a bad case.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ChallengeError(f"input folder not found: {input_dir}")
    cases = sorted(input_dir.glob("*.npz"))
    if not cases:
        raise ChallengeError(f"input folder {input_dir} holds no .npz case")
    if output_dir.exists() and not output_dir.is_dir():
        raise ChallengeError(f"output {output_dir} exists and is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for path in cases:
        run = run_case(model, path, output_dir, stop_when_empty=stop_when_empty)
        runs.append(run)
        if on_case is not None:
            on_case(run)
    write_times(output_dir / TIMES_FILE, runs)
    return runs


def write_times(path: Path, runs: list[CaseRun]) -> None:
    """``case,time,kind,objects,encoded,decoded_slices`` per case (seconds to 4 decimals), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["case", "time", "kind", "objects", "encoded", "decoded_slices"])
            for r in runs:
                out.writerow([r.case, f"{r.seconds:.4f}", r.kind, r.objects, r.encoded, r.decoded_slices])

    atomic_write(path, write)


__all__ = ["CaseRun", "ChallengeError", "TIMES_FILE", "run_case", "run_challenge", "write_times"]

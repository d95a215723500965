"""The precision check where the model runs: a reduced-precision variant is checked on the CPU it lands on.

The export gate (``medsam_rt_export.parity.check_variant``) ran on the machine that exported; a model directory
copied to another CPU runs other kernels there (NOTES: ONNX Runtime's int8 and fp16 kernels differ between AVX2,
AVX-512 and VNNI CPUs). So an export also writes a small **check sample** (``check_sample.npz``: a few of the
validation images with their boxes and the fp32 graphs' masks and IoU scores), and the first time an int8 or fp16
variant is loaded on a CPU class (:func:`medsam_rt.core.cpu.cpu_class`) not seen before for those graph files, the
runtime segments the sample with it and compares with the stored fp32 results against the export gate's own
thresholds. The outcome is remembered per CPU class and graph checksums in the user's cache directory
(:mod:`medsam_rt.core.records`), so later loads cost nothing.

A variant that fails is refused (:class:`~medsam_rt.errors.PrecisionCheckError`); with ``precision="auto"`` the
model falls back to fp32 and says so once per process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam_rt.core.cpu import cpu_class, cpu_info, describe_cpu
from medsam_rt.core.manifest import GraphEntry, Manifest, verify_graph
from medsam_rt.core.records import put_record, read_records, record_path
from medsam_rt.errors import ModelDirError, PrecisionCheckError

if TYPE_CHECKING:
    from medsam_rt.core.model import MedSAM

log = logging.getLogger("medsam_rt")

CHECK_SAMPLE_FILE = "check_sample.npz"
#: Environment variable naming the file of remembered check outcomes ("off": remember in this process only).
CHECK_CACHE_ENV = "MEDSAM_RT_CHECK_CACHE"
_CHECK_ROLE = "check_sample"
_outcomes: dict[str, dict[str, Any]] = {}
_warned: set[str] = set()
_lock = threading.Lock()


@dataclass(frozen=True)
class CheckCase:
    """One image of the check sample.

    Attributes:
        name: the validation sample it comes from.
        image: uint8 or uint16 ``(H, W)`` / ``(H, W, 3)``.
        boxes: float64 ``(N, 4)`` x0, y0, x1, y1 in the image's pixels.
        masks: bool ``(N, H, W)``: the fp32 graphs' masks at export.
        scores: float32 ``(N,)``: the fp32 graphs' IoU scores at export.
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    scores: np.ndarray


def write_check_sample(path: str | Path, cases: Sequence[CheckCase]) -> None:
    """Write ``cases`` as an npz (masks bit-packed); names go to the manifest, not the file."""
    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(cases):
        arrays[f"image_{i}"] = np.ascontiguousarray(c.image)
        arrays[f"boxes_{i}"] = np.asarray(c.boxes, np.float64).reshape(-1, 4)
        arrays[f"masks_{i}"] = np.packbits(np.asarray(c.masks, bool).reshape(-1))
        arrays[f"scores_{i}"] = np.asarray(c.scores, np.float32).reshape(-1)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def read_check_sample(path: str | Path, names: Sequence[str]) -> list[CheckCase]:
    """Read a check sample written by :func:`write_check_sample` (``names`` from the manifest).

    Raises:
        ModelDirError: the file is unreadable or does not hold ``len(names)`` consistent cases.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            cases = []
            for i, name in enumerate(names):
                image, boxes = data[f"image_{i}"], data[f"boxes_{i}"]
                n, h, w = len(boxes), image.shape[0], image.shape[1]
                masks = np.unpackbits(data[f"masks_{i}"], count=n * h * w).astype(bool).reshape(n, h, w)
                cases.append(CheckCase(str(name), image, boxes, masks, data[f"scores_{i}"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelDirError(f"cannot read the check sample {path}: {exc}") from None
    return cases


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def run_check(model: MedSAM, cases: Sequence[CheckCase], thresholds: dict[str, Any], gated: bool) -> dict[str, Any]:
    """Segment ``cases`` with ``model`` and compare with their stored fp32 results.

    Passes when every output is finite and, if ``gated`` (trained weights), every box's mask Dice vs fp32 is at
    least ``thresholds["min_dice"]`` and every IoU-score difference at most ``thresholds["max_iou_diff"]``.

    Returns:
        ``{"passed", "min_dice", "max_iou_diff", "worst", "finite", "boxes", "seconds", "gated"}`` (a failure
        also names its ``metric``, ``value`` and ``bound``).
    """
    start = time.perf_counter()
    dices, iou_diffs, finite, worst = [], [], True, ("", 1.0)
    for case in cases:
        res = model.segment(model.embed(case.image), case.boxes)
        finite = finite and bool(np.isfinite(res.scores).all() and np.isfinite(res.low_res_logits).all())
        for k in range(len(case.boxes)):
            d = _dice(res.masks[k], case.masks[k])
            dices.append(d)
            if d < worst[1]:
                worst = (f"{case.name}, box {k}", d)
        iou_diffs.append(float(np.abs(res.scores - case.scores).max()))
    report: dict[str, Any] = {
        "min_dice": min(dices),
        "max_iou_diff": max(iou_diffs),
        "worst": worst[0],
        "finite": finite,
        "boxes": len(dices),
        "seconds": round(time.perf_counter() - start, 3),
        "gated": gated,
    }
    failure = None
    if not finite:
        failure = ("finite outputs", float("nan"), "finite")
    elif gated and report["min_dice"] < thresholds["min_dice"]:
        failure = ("mask Dice vs fp32", report["min_dice"], f">= {thresholds['min_dice']}")
    elif gated and report["max_iou_diff"] > thresholds["max_iou_diff"]:
        failure = ("IoU-score diff vs fp32", report["max_iou_diff"], f"<= {thresholds['max_iou_diff']}")
    report["passed"] = failure is None
    if failure is not None:
        report["metric"], report["value"], report["bound"] = failure
    return report


def check_entry(manifest: Manifest) -> GraphEntry | None:
    """The manifest's check sample file, verified like the graphs (size, sha256); ``None`` when absent."""
    raw = manifest.raw.get("check_sample")
    if raw is None:
        return None
    try:
        entry = GraphEntry(_CHECK_ROLE, "fp32", manifest.directory / raw["file"], str(raw["sha256"]), int(raw["bytes"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{manifest.directory}/manifest.json: malformed check_sample entry {exc}") from None
    verify_graph(entry)
    return entry


def precision_check(model: MedSAM, manifest: Manifest, device: str) -> dict[str, Any] | None:
    """The load-time check of ``model``'s variant on this CPU class (run once per class and graph files, then
    remembered). ``None`` for fp32, or a directory exported without a check sample.

    Returns:
        the check's report plus ``"cpu_class"`` and ``"cached"`` (whether it came from the records).
    """
    precision = model.precision
    raw = manifest.raw.get("check_sample")
    if precision == "fp32" or raw is None or precision not in raw.get("precisions", []):
        return None
    entry = check_entry(manifest)
    graphs = [manifest.graph(role, precision).sha256 for role in ("encoder", "decoder")]
    where = cpu_class() if device == "cpu" else f"{device}:{cpu_class()}"
    key = "|".join([where, *graphs, entry.sha256])
    file = record_path(CHECK_CACHE_ENV, "precision-checks.json")
    with _lock:
        known = _outcomes.get(key)
    if known is None:
        known = read_records(file).get(key)
    if isinstance(known, dict) and "passed" in known:
        with _lock:
            _outcomes[key] = known
        return {**known, "cpu_class": where, "cached": True}
    cases = read_check_sample(entry.path, raw["samples"])
    thresholds = raw["thresholds"][precision]
    report = run_check(model, cases, thresholds, gated=bool(raw.get("gated", True)))
    report["cpu"] = describe_cpu(cpu_info())
    with _lock:
        _outcomes[key] = report
    put_record(file, key, report)
    return {**report, "cpu_class": where, "cached": False}


def refusal(manifest: Manifest, precision: str, report: dict[str, Any]) -> PrecisionCheckError:
    """The error for a variant that failed its check here."""
    value = report.get("value")
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return PrecisionCheckError(
        f"the {precision} variant of {manifest.directory} failed its check on this CPU ({report['cpu_class']}): "
        f"{report.get('metric')} {shown}, expected {report.get('bound')}"
        + (f" ({report['worst']})" if report.get("worst") and "Dice" in str(report.get("metric")) else "")
        + "; load precision='fp32' (or 'auto', which falls back to fp32)",
        precision=precision,
        metric=str(report.get("metric")),
        value=value,
        bound=str(report.get("bound")),
    )


def warn_fallback(manifest: Manifest, error: PrecisionCheckError) -> None:
    """Log, once per process and directory, that ``precision="auto"`` fell back to fp32."""
    key = f"{manifest.directory}:{error.precision}"
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("%s; using fp32", error)


__all__ = [
    "CHECK_CACHE_ENV",
    "CHECK_SAMPLE_FILE",
    "CheckCase",
    "check_entry",
    "precision_check",
    "read_check_sample",
    "refusal",
    "run_check",
    "warn_fallback",
    "write_check_sample",
]

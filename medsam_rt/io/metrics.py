"""The CVPR 2024 challenge's metrics: Dice (DSC) and normalised surface distance (NSD) per case and label.

As the challenge's ``evaluation/compute_metrics.py`` computes them:

- labels ``1 .. max(ground truth)``; a case's DSC is the mean over them;
- NSD at a 2 mm tolerance with the case's voxel spacing (``spacing[i]`` for array axis ``i``, as the reference
  passes the npz's ``spacing``); 2-D cases as one-slice volumes ``(H, W, 1)`` with unit spacing;
- NSD only for cases whose mean DSC is above 0.2 (others score NSD 0).

Surfaces are those of DeepMind's ``surface-distance`` (which the reference vendors): each 2x2x2 neighbourhood of
the mask (padded by one voxel) is a surface element when it is neither empty nor full; its area is that of the
marching-cubes surface through it, scaled by the spacing; distances are Euclidean distance transforms between
the two masks' surface elements. NSD = (area of each surface within the tolerance of the other) / (total area).

One difference, on purpose: a label absent from both the prediction and the ground truth (a gap in the ground
truth's label numbers, predicted nowhere) is reported as ``absent`` and left out of the case's means. The
reference's Dice is NaN there (0/0), which makes the case's mean NaN, its NSD 0 (NaN is not > 0.2), and the
case drops out of any mean over cases. A case without any label is reported with NaN means and left out of the
summary's means (and counted).

scipy (distance transform, correlation) and scikit-image (marching cubes, for the surface areas) are needed for
NSD only: the ``metrics`` extra. They are imported when NSD is computed, never by the runtime.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from medsam_rt.errors import MetricsError

#: The challenge's surface tolerance (mm).
NSD_TOLERANCE_MM = 2.0
#: NSD is computed only for cases whose mean DSC exceeds this.
NSD_MIN_DSC = 0.2


@dataclass(frozen=True)
class LabelScore:
    """One label of one case.

    Attributes:
        label: the label value.
        status: ``"scored"``, ``"absent"`` (in neither mask: not in the means) or ``"missing"`` (the case has no
            prediction file: scored 0).
        dsc: Dice, NaN when absent.
        nsd: NSD at the tolerance, NaN when absent or when the case's DSC is <= 0.2 (the case then scores 0).
        gt_voxels, pred_voxels: voxel counts.
    """

    label: int
    status: str
    dsc: float
    nsd: float
    gt_voxels: int
    pred_voxels: int


@dataclass(frozen=True)
class CaseScore:
    """One case: the mean DSC and NSD over its scored labels (NSD 0 when DSC <= 0.2), and every label."""

    case: str
    dsc: float
    nsd: float
    labels: tuple[LabelScore, ...]


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """``2 |gt & pred| / (|gt| + |pred|)`` of two bool masks; NaN when both are empty."""
    total = int(gt.sum()) + int(pred.sum())
    return float("nan") if total == 0 else 2.0 * int((gt & pred).sum()) / total


@lru_cache(maxsize=32)
def surfel_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    """float64 ``(256,)``: surface area (mm²) inside a 2x2x2 neighbourhood, by its occupancy code.

    The code's bits are the 8 voxels in C order, bit 7 for ``[0, 0, 0]`` down to bit 0 for ``[1, 1, 1]``. The area
    is the marching-cubes surface at level 0.5 (Lorensen's table) with the voxel size ``spacing``, taken for the
    code's side with at most four voxels set (the complement's surface is the same surface, and this keeps
    ambiguous faces separated as ``surface-distance``'s table does; a test compares the two).
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    bits = (1 << np.arange(7, -1, -1)).reshape(2, 2, 2)
    areas = np.zeros(256)
    for code in range(1, 255):
        side = code if bin(code).count("1") <= 4 else 255 - code
        cube = ((side & bits) > 0).astype(np.float64)
        verts, faces, _, _ = marching_cubes(cube, 0.5, spacing=spacing, method="lorensen")
        areas[code] = mesh_surface_area(verts.astype(np.float64), faces)
    areas.setflags(write=False)
    return areas


def _surfaces(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float]):
    """Per mask: bool surface map and the surface area map, on the union's bounding box padded by one voxel."""
    from scipy import ndimage

    union = gt | pred
    lo = [int(np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != i))).min()) for i in range(3)]
    hi = [int(np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != i))).max()) + 1 for i in range(3)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    shape = tuple(b - a + 1 for a, b in zip(lo, hi, strict=True))  # one more voxel after the end of each axis
    kernel = (1 << np.arange(7, -1, -1)).reshape(2, 2, 2)
    areas = surfel_areas(tuple(float(s) for s in spacing))
    out = []
    for mask in (gt, pred):
        padded = np.zeros(shape, np.uint8)
        padded[tuple(slice(0, b - a) for a, b in zip(lo, hi, strict=True))] = mask[crop]
        # code at p from the voxels p-1 .. p along each axis (origin 0 of an even kernel), 0 outside
        code = ndimage.correlate(padded.astype(np.int32), kernel, mode="constant", cval=0)
        surface = (code != 0) & (code != 255)
        out.append((surface, areas[code]))
    return out


def nsd(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface distance of two bool 3-D masks at ``tolerance`` mm; NaN when both are empty.

    0 when exactly one is empty (no surface within reach of the other).
    """
    from scipy import ndimage

    if gt.ndim != 3 or gt.shape != pred.shape:
        raise MetricsError(f"nsd needs two 3-D masks of one shape; got {gt.shape} and {pred.shape}")
    if not gt.any() and not pred.any():
        return float("nan")
    if not gt.any() or not pred.any():
        return 0.0
    spacing3 = tuple(float(s) for s in spacing)
    (surf_gt, area_gt), (surf_pred, area_pred) = _surfaces(gt, pred, spacing3)
    dist_to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=spacing3)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing3)
    near_gt = area_gt[surf_gt][dist_to_pred[surf_gt] <= tolerance].sum()
    near_pred = area_pred[surf_pred][dist_to_gt[surf_pred] <= tolerance].sum()
    total = area_gt[surf_gt].sum() + area_pred[surf_pred].sum()
    return float((near_gt + near_pred) / total)


def score_case(
    name: str,
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float] | None,
    tolerance: float = NSD_TOLERANCE_MM,
) -> CaseScore:
    """DSC and NSD of one case, per label ``1 .. gt.max()`` (see the module docstring for the rules).

    Args:
        name: the case's name (its file name).
        gt, pred: integer label arrays of one shape: ``(D, H, W)`` (3-D) or ``(H, W)`` (2-D).
        spacing: ``(3,)`` mm per array axis for 3-D cases; ignored for 2-D cases (unit spacing).
        tolerance: NSD tolerance in mm.

    Raises:
        MetricsError: shapes differ, or a 3-D case without spacing.
    """
    if gt.shape != pred.shape:
        raise MetricsError(f"{name}: prediction shape {pred.shape} differs from the ground truth's {gt.shape}")
    if gt.ndim == 2:
        gt, pred, spacing3 = gt[:, :, None], pred[:, :, None], (1.0, 1.0, 1.0)
    elif gt.ndim == 3:
        if spacing is None or len(spacing) != 3:
            raise MetricsError(f"{name}: a 3-D case needs its spacing (3 numbers), got {spacing!r}")
        spacing3 = tuple(float(s) for s in spacing)
    else:
        raise MetricsError(f"{name}: expected (H, W) or (D, H, W) labels, got shape {gt.shape}")
    top = int(gt.max()) if gt.size else 0
    rows = []
    for label in range(1, top + 1):
        g, p = gt == label, pred == label
        ng, np_ = int(g.sum()), int(p.sum())
        if ng == 0 and np_ == 0:
            rows.append(LabelScore(label, "absent", math.nan, math.nan, 0, 0))
        else:
            rows.append(LabelScore(label, "scored", dice(g, p), math.nan, ng, np_))
    scored = [r for r in rows if r.status == "scored"]
    case_dsc = float(np.mean([r.dsc for r in scored])) if scored else math.nan
    case_nsd = math.nan if not scored else 0.0
    if scored and case_dsc > NSD_MIN_DSC:
        rows = [
            replace(r, nsd=nsd(gt == r.label, pred == r.label, spacing3, tolerance)) if r.status == "scored" else r
            for r in rows
        ]
        case_nsd = float(np.mean([r.nsd for r in rows if r.status == "scored"]))
    return CaseScore(name, case_dsc, case_nsd, tuple(rows))


def _load(path: Path, key: str) -> np.lib.npyio.NpzFile:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip, pickle and format errors
        raise MetricsError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if key not in data:
        raise MetricsError(f"{path} holds no '{key}' array (it has {', '.join(data.files) or 'nothing'})")
    return data


def evaluate(
    pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], tolerance: float = NSD_TOLERANCE_MM
) -> list[CaseScore]:
    """Score every ground-truth case (``GT_DIR/*.npz`` with ``gts``, and ``spacing`` for 3-D) against
    ``PRED_DIR/<same name>`` (``segs``). A case without a prediction scores DSC 0 and NSD 0 (its labels
    ``"missing"``). Cases are sorted by name; 3-D cases are those whose name starts with ``3D``.

    Raises:
        MetricsError: a folder is missing or holds no case, a file is unreadable or lacks its array, or shapes
            differ.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise MetricsError(f"{what} folder not found: {folder}")
    names = sorted(p.name for p in gt_dir.glob("*.npz"))
    if not names:
        raise MetricsError(f"ground-truth folder {gt_dir} holds no .npz case")
    scores = []
    for name in names:
        gt_data = _load(gt_dir / name, "gts")
        gts = np.asarray(gt_data["gts"])
        if not (pred_dir / name).is_file():
            top = int(gts.max()) if gts.size else 0
            labels = tuple(LabelScore(k, "missing", 0.0, 0.0, int((gts == k).sum()), 0) for k in range(1, top + 1))
            scores.append(CaseScore(name, 0.0, 0.0, labels))
            continue
        segs = np.asarray(_load(pred_dir / name, "segs")["segs"])
        three_d = name.startswith("3D")
        if three_d and "spacing" not in gt_data:
            raise MetricsError(f"{gt_dir / name} is a 3-D case without 'spacing'")
        spacing = np.asarray(gt_data["spacing"], np.float64).reshape(-1) if three_d else None
        scores.append(score_case(name, gts, segs, spacing, tolerance))
    return scores


def write_csv(path: str | os.PathLike[str], scores: list[CaseScore]) -> None:
    """One row per case and label: ``case, label, status, dsc, nsd, gt_voxels, pred_voxels, case_dsc,
    case_nsd`` (NaN as an empty field). Written atomically."""
    from medsam_rt.core.images import atomic_write

    def cell(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.6f}"

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["case", "label", "status", "dsc", "nsd", "gt_voxels", "pred_voxels", "case_dsc", "case_nsd"])
            for case in scores:
                for r in case.labels:
                    out.writerow(
                        [case.case, r.label, r.status, cell(r.dsc), cell(r.nsd), r.gt_voxels, r.pred_voxels]
                        + [cell(case.dsc), cell(case.nsd)]
                    )

    atomic_write(path, write)


def summary(scores: list[CaseScore]) -> dict:
    """Means of the cases' DSC and NSD, overall and for 2-D / 3-D cases, with counts (cases without labels
    are counted apart and left out of the means)."""
    out: dict = {}
    for group, members in (
        ("all", scores),
        ("2D", [s for s in scores if not s.case.startswith("3D")]),
        ("3D", [s for s in scores if s.case.startswith("3D")]),
    ):
        valid = [s for s in members if not math.isnan(s.dsc)]
        if not members:
            continue
        out[group] = {
            "cases": len(members),
            "without_labels": len(members) - len(valid),
            "dsc": round(float(np.mean([s.dsc for s in valid])), 4) if valid else None,
            "nsd": round(float(np.mean([s.nsd for s in valid])), 4) if valid else None,
            "absent_labels": sum(r.status == "absent" for s in members for r in s.labels),
            "missing_predictions": sum(1 for s in members if any(r.status == "missing" for r in s.labels)),
        }
    return out


__all__ = [
    "CaseScore",
    "LabelScore",
    "MetricsError",
    "NSD_MIN_DSC",
    "NSD_TOLERANCE_MM",
    "dice",
    "evaluate",
    "nsd",
    "score_case",
    "summary",
    "surfel_areas",
    "write_csv",
]

"""The CVPR24 formats: `challenge` on a folder of 2-D and 3-D npz cases (outputs as the reference writes them,
scored the way the reference's compute_metrics.py scores them), and `metrics` (DSC/NSD) against hand-computed
cases, the surface-distance package and the reference's NaN rule for absent labels."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from medsam_rt import MedSAM
from medsam_rt.core.volume import ellipsoid_phantom
from medsam_rt.io.challenge import TIMES_FILE, run_challenge
from medsam_rt.io.metrics import MetricsError, dice, evaluate, nsd, score_case, summary, surfel_areas
from medsam_rt.tools.cli import main


def cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


# --- metrics against hand-computed values --------------------------------------------------------------------


def test_dice_by_hand():
    a = cube((8, 8), (0, 0), (4, 4))  # 16 pixels
    b = cube((8, 8), (0, 2), (4, 6))  # 16 pixels, 8 shared
    assert dice(a, b) == 2 * 8 / 32 == 0.5
    assert math.isnan(dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))


def test_nsd_by_hand_and_the_spacing_axis():
    shape = (20, 10, 10)
    a = cube(shape, (2, 2, 2), (6, 8, 8))
    assert nsd(a, a, (1.0, 1.0, 1.0)) == 1.0
    assert nsd(a, np.zeros(shape, bool), (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(nsd(np.zeros(shape, bool), np.zeros(shape, bool), (1.0, 1.0, 1.0)))
    b = cube(shape, (8, 2, 2), (12, 8, 8))  # the same cube two voxels further along axis 0
    # axis 0 at 0.1 mm: the whole of each surface lies within 2 mm of the other; at 3 mm: none of it
    assert nsd(a, b, (0.1, 1.0, 1.0)) == pytest.approx(1.0)
    assert nsd(a, b, (3.0, 1.0, 1.0)) == 0.0


def test_case_scores_gate_nsd_on_dice_and_set_absent_labels_apart():
    gt = np.zeros((6, 12, 12), np.uint8)
    gt[1:4, 1:5, 1:5] = 1
    gt[2:5, 7:11, 7:11] = 3  # label 2 exists in neither mask
    pred = gt.copy()
    case = score_case("3Dcase.npz", gt, pred, (2.0, 1.0, 1.0))
    assert [r.status for r in case.labels] == ["scored", "absent", "scored"]
    assert case.dsc == 1.0 and case.nsd == 1.0  # the reference: NaN for both (label 2's 0/0 Dice spreads)
    low = np.zeros_like(gt)
    low[1:4, 1:5, 1:2] = 1  # a quarter of label 1, label 3 missed: mean DSC 0.2 -> NSD 0 without computing it
    case = score_case("3Dlow.npz", gt, low, (2.0, 1.0, 1.0))
    assert case.dsc == pytest.approx((2 * 12 / (48 + 12) + 0.0) / 2) and case.dsc <= 0.2
    assert case.nsd == 0.0 and all(math.isnan(r.nsd) for r in case.labels)
    flat = score_case("2Dimg.npz", gt[2], pred[2], None)  # 2-D: one-slice volume, unit spacing
    assert flat.dsc == 1.0 and flat.nsd == 1.0
    with pytest.raises(MetricsError, match="differs"):
        score_case("x.npz", gt, pred[:3], (1, 1, 1))


def test_matches_the_surface_distance_package():
    sd = pytest.importorskip("surface_distance")
    from surface_distance import lookup_tables

    for spacing in [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.7, 1.3, 3.0)]:
        np.testing.assert_allclose(
            surfel_areas(spacing), lookup_tables.create_table_neighbour_code_to_surface_area(spacing), atol=1e-9
        )
    rng = np.random.default_rng(1)
    from scipy import ndimage

    for trial, spacing in enumerate([(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (3.0, 0.7, 1.1)]):
        a = ndimage.gaussian_filter(rng.random((10, 30, 28)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((10, 30, 28)), 2) > 0.5
        ref = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(a, b, spacing), 2.0)
        assert nsd(a, b, spacing) == pytest.approx(ref, abs=1e-12), trial
        assert dice(a, b) == pytest.approx(sd.compute_dice_coefficient(a, b), abs=1e-12)


# --- the challenge runner -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A 3-D case (two ellipsoids, 6 slices of 256x256) and a 2-D case, with their ground truth."""
    root = tmp_path_factory.mktemp("cvpr24")
    imgs, gts = root / "imgs", root / "gts"
    imgs.mkdir()
    gts.mkdir()
    ph = ellipsoid_phantom(
        (6, 256, 256), [((2, 90, 90), (6, 30, 30)), ((3, 160, 170), (8, 35, 25))], spacing=(2.0, 1.0, 1.0)
    )
    np.savez_compressed(
        imgs / "3DBox_phantom.npz", imgs=ph.volume, boxes=ph.boxes3d.astype(np.int64), spacing=np.array(ph.spacing)
    )
    np.savez_compressed(gts / "3DBox_phantom.npz", gts=ph.truth, spacing=np.array(ph.spacing))
    flat = ellipsoid_phantom((1, 200, 240), [((0, 60, 70), (1, 30, 40)), ((0, 130, 160), (1, 35, 30))])
    rgb = np.repeat(flat.volume[0][:, :, None], 3, axis=-1)
    boxes2d = flat.boxes3d[:, [0, 1, 3, 4]].astype(np.int64)
    np.savez_compressed(imgs / "2DBox_phantom.npz", imgs=rgb, boxes=boxes2d)
    np.savez_compressed(gts / "2DBox_phantom.npz", gts=flat.truth[0])
    return root, ph, rgb, boxes2d


@pytest.fixture(scope="module")
def lite(lite_dir):
    return MedSAM.load(lite_dir, precision="fp32", cache=True)


def test_challenge_outputs_and_reference_scoring(lite, cases, tmp_path):
    root, ph, rgb, boxes2d = cases
    out = tmp_path / "segs"
    runs = run_challenge(lite, root / "imgs", out)
    assert [r.case for r in runs] == ["2DBox_phantom.npz", "3DBox_phantom.npz"]
    assert [r.kind for r in runs] == ["2D", "3D"] and runs[1].encoded == 6 and runs[1].decoded_slices == 6
    with open(out / TIMES_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["2DBox_phantom.npz", "3DBox_phantom.npz"] and float(rows[1]["time"]) > 0

    # as the reference's compute_metrics.py reads them: np.load(..., allow_pickle=True, mmap_mode="r")["segs"]
    segs3 = np.load(out / "3DBox_phantom.npz", allow_pickle=True, mmap_mode="r")["segs"]
    segs2 = np.load(out / "2DBox_phantom.npz", allow_pickle=True, mmap_mode="r")["segs"]
    assert segs3.shape == ph.truth.shape and segs3.dtype == np.uint8 and segs2.shape == rgb.shape[:2]
    np.testing.assert_array_equal(segs3, lite.segment_volume(ph.volume, ph.boxes3d).labels)
    masks = lite.segment(lite.embed(rgb), boxes2d).masks
    expected = np.zeros(rgb.shape[:2], np.uint8)
    for k, m in enumerate(masks, 1):
        expected[m] = k  # the reference's 2-D rule: later boxes over earlier
    np.testing.assert_array_equal(segs2, expected)

    scores = {s.case: s for s in evaluate(out, root / "gts")}
    assert scores["3DBox_phantom.npz"].dsc >= 0.9 and scores["2DBox_phantom.npz"].dsc >= 0.9
    sd = pytest.importorskip("surface_distance")
    # the reference's per-case rule with the package the reference vendors: labels 1..max(gt), NSD if DSC > 0.2
    for name, spacing, expand in (("3DBox_phantom.npz", ph.spacing, False), ("2DBox_phantom.npz", (1, 1, 1), True)):
        gt = np.load(root / "gts" / name)["gts"]
        seg = np.load(out / name, allow_pickle=True, mmap_mode="r")["segs"]
        gt, seg = (gt[..., None], seg[..., None]) if expand else (gt, seg)
        labels = range(1, int(gt.max()) + 1)
        ref_dsc = np.mean([sd.compute_dice_coefficient(gt == i, seg == i) for i in labels])
        ref_nsd = np.mean(
            [
                sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(gt == i, seg == i, spacing), 2.0)
                for i in labels
            ]
        )
        assert scores[name].dsc == pytest.approx(ref_dsc, abs=1e-12)
        assert scores[name].nsd == pytest.approx(ref_nsd, abs=1e-12)


def test_challenge_and_metrics_commands(lite_dir, cases, tmp_path, capsys):
    root, *_ = cases
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "2DBox_phantom.npz").write_bytes((root / "imgs" / "2DBox_phantom.npz").read_bytes())
    out = tmp_path / "segs"
    assert main(["challenge", str(lite_dir), str(imgs), str(out)]) == 0
    assert "2DBox_phantom.npz: 2D, 2 object(s)" in capsys.readouterr().out
    assert main(["metrics", str(out), str(root / "gts"), "--json"]) == 0
    text = capsys.readouterr().out
    assert '"missing_predictions": 1' in text  # the 3-D case was not run: it scores 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case"] for r in rows} == {"2DBox_phantom.npz", "3DBox_phantom.npz"}
    assert all(r["status"] == "missing" and float(r["dsc"]) == 0.0 for r in rows if r["case"].startswith("3D"))
    info = summary(evaluate(out, root / "gts"))
    assert info["2D"]["dsc"] >= 0.9 and info["3D"]["dsc"] == 0.0
    assert main(["metrics", str(tmp_path / "nowhere"), str(root / "gts")]) == 2
    assert "prediction folder not found" in capsys.readouterr().err

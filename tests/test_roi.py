"""--roi (medsam_rt.core.roi): windows around boxes, masks back in original coordinates, small objects at their
scale."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from medsam_rt import MedSAM, Segmentation
from medsam_rt.core.roi import plan_windows, segment_roi
from medsam_rt.errors import InvalidBoxError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from phantoms import crop_dice, make_phantom  # noqa: E402


def test_windows_are_squares_around_boxes_moved_inside_the_image():
    (w,) = plan_windows([[100, 200, 120, 230]], (1000, 2000), 256)  # 30 px tall: min_side 128 wins
    assert (w.h, w.w, w.boxes) == (128, 128, (0,))
    assert (w.x0, w.y0) == (110 - 64, 215 - 64)
    (w,) = plan_windows([[0, 990, 10, 1000]], (1000, 2000), 256)  # at the corner: moved inside
    assert (w.y0, w.x0, w.h, w.w) == (1000 - 128, 0, 128, 128)
    (w,) = plan_windows([[100, 100, 500, 300]], (1000, 2000), 256)  # 400 px wide: 2x with margin 0.5
    assert (w.y0, w.x0, w.h, w.w) == (0, 0, 800, 800)  # centred at (300, 200), moved inside
    (w,) = plan_windows([[10, 10, 1900, 990]], (1000, 2000), 256)  # larger than the image: clipped
    assert (w.y0, w.x0, w.h, w.w) == (0, 0, 1000, 2000)


def test_close_boxes_share_a_window_far_ones_do_not():
    boxes = [[100, 100, 130, 130], [150, 110, 180, 140], [1500, 800, 1530, 830]]
    wins = plan_windows(boxes, (1000, 2000), 256)
    assert sorted(w.boxes for w in wins) == [(0, 1), (2,)]
    shared = next(w for w in wins if w.boxes == (0, 1))
    assert shared.x0 <= 100 and shared.x0 + shared.w >= 180 and shared.y0 <= 100 and shared.y0 + shared.h >= 140
    # a tighter max_side keeps them apart
    assert len(plan_windows(boxes, (1000, 2000), 256, max_side=130)) == 3
    with pytest.raises(InvalidBoxError):
        plan_windows([[0, 0, 3000, 10]], (1000, 2000), 256)
    with pytest.raises(ValueError, match="margin"):
        plan_windows(boxes, (1000, 2000), 256, margin=-1)


def test_one_window_over_the_whole_image_is_whole_image_mode(tiny_dir):
    """A window that is the image (min_side >= the image) embeds the same pixels: masks equal bit for bit, in
    original coordinates, with scores, label image and probabilities."""
    model = MedSAM.load(tiny_dir)
    image = np.random.default_rng(0).integers(0, 256, (180, 240), dtype=np.uint8)
    boxes = np.array([[20, 30, 120, 150], [100, 40, 230, 170]], np.float64)
    ref = model.segment(model.embed(image), boxes)
    roi = segment_roi(model, image, boxes, min_side=240)
    assert isinstance(roi, Segmentation) and len(roi.upscale.windows) == 1
    np.testing.assert_array_equal(roi.masks, ref.masks)
    np.testing.assert_array_equal(roi.scores, ref.scores)
    np.testing.assert_array_equal(roi.label_image(), ref.label_image())
    np.testing.assert_allclose(roi.probs, ref.probs, atol=1e-6)


def test_windowed_masks_are_in_original_coordinates(tiny_dir):
    model = MedSAM.load(tiny_dir)
    image = np.random.default_rng(1).integers(0, 256, (900, 1300), dtype=np.uint8)
    boxes = np.array([[50, 60, 90, 100], [1000, 700, 1060, 760]], np.float64)
    roi = segment_roi(model, image, boxes, min_side=128, max_side=256)  # (the tiny model's input is 1024)
    assert len(roi.upscale.windows) == 2
    for k, win in enumerate(sorted(roi.upscale.windows, key=lambda w: w.boxes)):
        c = roi.crops[k]
        if c.mask.size:  # inside its window, which holds its box
            assert win.y0 <= c.y0 and c.y0 + c.mask.shape[0] <= win.y0 + win.h
            assert win.x0 <= c.x0 and c.x0 + c.mask.shape[1] <= win.x0 + win.w
        assert win.x0 <= boxes[k, 0] and boxes[k, 2] <= win.x0 + win.w
    probs = roi.probs
    assert probs.shape == (2, 900, 1300) and probs[0, 800:, 1200:].max() == 0.0  # outside window 0: background
    np.testing.assert_array_equal(probs[0] > 0.5, roi.masks[0])
    same = model.predict(image, boxes, roi={"min_side": 128, "max_side": 256})  # the facade's roi= forward
    np.testing.assert_array_equal(same.masks, roi.masks)
    np.testing.assert_array_equal(same.scores, roi.scores)
    whole = model.predict(image, boxes)  # roi off: the whole image, as segment(embed(image))
    np.testing.assert_array_equal(whole.masks, model.segment(model.embed(image), boxes).masks)


def test_small_objects_segmented_at_their_scale(lite_dir):
    """LiteMedSAM (real weights) on a 3000x3000 phantom: ellipses of 16-30 px are lost in whole-image mode (the
    256-pixel encoder sees them at ~2 px) and found with windows; a large ellipse is found either way."""
    rng = np.random.default_rng(5)
    radii = [(400.0, 300.0)] + [(float(a), float(a * 0.8)) for a in rng.uniform(8, 15, 4)]
    ph = make_phantom(3000, radii, seed=5)
    model = MedSAM.load(lite_dir, precision="fp32")
    whole = model.segment(model.embed(ph.image), ph.boxes)
    roi = segment_roi(model, ph.image, ph.boxes)

    def dice(seg, k):
        y0, x0, truth = ph.truth(k)
        return crop_dice(seg.crops[k], y0, x0, truth)

    small = range(1, len(ph.boxes))
    d_whole, d_roi = [dice(whole, k) for k in small], [dice(roi, k) for k in small]
    print({"whole": np.round(d_whole, 3).tolist(), "roi": np.round(d_roi, 3).tolist()})
    assert min(d_roi) >= 0.9 and np.median(d_whole) < 0.5, (d_roi, d_whole)
    assert dice(whole, 0) > 0.95 and dice(roi, 0) > 0.95


def test_cli_roi_writes_the_windowed_masks(tiny_dir, tmp_path):
    from PIL import Image

    from medsam_rt.io.results import read_npz
    from medsam_rt.tools.cli import main

    image = np.random.default_rng(2).integers(0, 256, (700, 1100), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    boxes = [[40, 50, 90, 100], [900, 500, 980, 600]]
    argv = ["segment", str(tiny_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "m.npz"), "--quiet", "--roi"]
    assert main([*argv, "--box", "40,50,90,100", "--box", "900,500,980,600"]) == 0
    ref = segment_roi(MedSAM.load(tiny_dir), image, boxes)
    np.testing.assert_array_equal(read_npz(tmp_path / "m.npz").dense(), ref.masks)

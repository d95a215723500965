"""3-D box prompts (medsam_rt.core.volume): LiteMedSAM against the CVPR24 reference loop in PyTorch on phantoms with
known truth (anisotropic voxels, several overlapping objects, objects touching the first and last slice), the
next-box rule against OpenCV, each slice embedded once, uint16 labels, stop-when-empty, and input errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medsam_rt import MedSAM
from medsam_rt.core.preprocess import Preprocessing, resized_shape
from medsam_rt.core.volume import ellipsoid_phantom, propagated_box, segment_volume, sweeps, validate_boxes3d
from medsam_rt.errors import InvalidBoxError, InvalidImageError
from medsam_rt.io.metrics import nsd

# (z, y, x) centres in voxels, (z, y, x) semi-axes in mm; voxels 2.5 x 0.8 x 0.8 mm: objects 1 and 2 overlap,
# object 1 touches slice 0, object 3 the last slice
SPACING = (2.5, 0.8, 0.8)
OBJECTS = [
    ((2.0, 100.0, 90.0), (7.0, 30.0, 24.0)),
    ((5.0, 120.0, 130.0), (10.0, 24.0, 36.0)),
    ((9.0, 190.0, 60.0), (4.0, 16.0, 16.0)),
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)


@pytest.fixture(scope="module")
def phantom():
    return ellipsoid_phantom((10, 256, 256), OBJECTS, spacing=SPACING, seed=3)


@pytest.fixture(scope="module")
def lite(lite_dir):
    return MedSAM.load(lite_dir, precision="fp32", cache=True)


@pytest.fixture(scope="module")
def runs(lite, phantom):
    pytest.importorskip("cv2")
    from medsam_rt_export.lite import LiteReference
    from medsam_rt_export.lite_volume import reference_segment_volume

    ours = lite.segment_volume(phantom.volume, phantom.boxes3d)
    ref = reference_segment_volume(LiteReference.load(), phantom.volume, phantom.boxes3d, reencode=False)
    return ours, ref


def test_phantom_boxes_touch_the_ends(phantom):
    z = phantom.boxes3d[:, [2, 5]]
    assert z.min() == 0 and z.max() == phantom.volume.shape[0] - 1
    assert phantom.truth.dtype == np.uint8 and set(np.unique(phantom.truth)) == {0, 1, 2, 3}


def test_reference_loop_identity_per_slice_and_free_running(lite, phantom, runs):
    ours, ref = runs
    # fed the reference's own boxes, every slice's mask is the reference's, pixel for pixel
    for k, masks in enumerate(ref.masks):
        for z, mask in masks.items():
            seg = lite.segment(lite.embed(phantom.volume[z]), ref.prompts[k, z], frame="encoder")
            np.testing.assert_array_equal(seg.masks[0], mask, err_msg=f"object {k + 1}, slice {z}")
    # free-running, the propagation reproduces the reference's boxes and labels (Dice >= 0.99 is the bound)
    np.testing.assert_array_equal(np.isnan(ours.prompts), np.isnan(ref.prompts))
    for k in range(len(phantom.boxes3d)):
        assert dice(ours.labels == k + 1, ref.segs == k + 1) >= 0.99, k
    assert ours.labels.dtype == np.uint8 and ours.labels.shape == phantom.volume.shape


def test_phantom_truth_dice_and_nsd(phantom, runs):
    ours, _ = runs
    scores = {}
    for k in range(1, len(OBJECTS) + 1):
        truth, got = phantom.truth == k, ours.labels == k
        scores[k] = (round(dice(got, truth), 4), round(nsd(truth, got, SPACING), 4))
    print("phantom Dice, NSD(2 mm) per object:", scores)
    assert all(d >= 0.9 for d, _ in scores.values()), scores  # the target
    assert all(n >= 0.75 for _, n in scores.values()), scores  # reported; 2.5 mm slices round the caps


def test_each_slice_embedded_once_and_later_objects_win(phantom, runs):
    ours, ref = runs
    up, down = sweeps(validate_boxes3d(phantom.boxes3d, phantom.volume.shape))
    assert ours.encoded == len(set(up) | set(down)) == phantom.volume.shape[0]
    assert ours.reused == len(set(up) & set(down)) > 0
    assert ref.encoded == ours.encoded  # (reencode=False here; the reference script encodes 3x as often)
    both = np.zeros(phantom.volume.shape, bool)
    for z, m in ref.masks[0].items():
        if z in ref.masks[1]:
            both[z] = m & ref.masks[1][z]
    assert both.any() and (ours.labels[both] == 2).all()
    # the decoded slices: z_mid .. z_max up and z_mid - 1 .. z_min down, both ends included
    for k, (_, _, z0, _, _, z1) in enumerate(phantom.boxes3d.astype(int)):
        assert np.flatnonzero(np.isfinite(ours.scores[k])).tolist() == list(range(z0, z1 + 1))


class ThresholdModel:
    """A stand-in for MedSAM whose "segmentation" of a box is the slice's bright pixels inside it (so a mask
    vanishes exactly where the object ends): it exercises the propagation's bookkeeping, not a network."""

    preprocessing = Preprocessing(
        "longest_side", 256, "area", "minmax", (256, 256), "crop_resize", box_scale="longest_side"
    )

    def __init__(self):
        self.encoded = 0

    def embed(self, image):
        self.encoded += 1
        return SimpleNamespace(embeddings=image)  # what the embedding cache sizes

    def segment(self, embedding, boxes, *, frame):
        assert frame == "encoder"
        image = embedding.embeddings
        scale = max(image.shape) / 256
        masks = np.zeros((len(boxes), *image.shape), bool)
        for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes) * scale):
            masks[k, int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
        masks &= image > 128
        return SimpleNamespace(masks=masks, scores=masks.mean(axis=(1, 2)).astype(np.float32))


def bright_volume():
    """Two bright blocks, object 1 on slices 2..5 and object 2 on slices 4..8, in a dark 10 x 64 x 64 volume; each
    box (and any box grown from its object) holds none of the other object."""
    volume = np.full((10, 64, 64), 20, np.uint8)
    volume[2:6, 10:30, 10:26] = 200
    volume[4:9, 34:54, 30:50] = 220
    boxes = np.array([[8, 8, 0, 28, 30, 9], [26, 32, 1, 52, 56, 9]], np.float64)
    return volume, boxes


def test_cache_budget_zero_encodes_overlaps_twice_same_labels():
    volume, boxes = bright_volume()
    kept = segment_volume(ThresholdModel(), volume, boxes)
    again = segment_volume(ThresholdModel(), volume, boxes, cache_bytes=0)
    up, down = sweeps(boxes)
    assert kept.encoded == len(set(up) | set(down)) == 10 and kept.reused == len(set(up) & set(down))
    assert again.encoded == len(up) + len(down) and again.reused == 0
    np.testing.assert_array_equal(again.labels, kept.labels)
    np.testing.assert_array_equal(again.prompts, kept.prompts)


def test_propagation_follows_the_object_and_stop_when_empty_ends_a_direction():
    volume, boxes = bright_volume()
    plain = segment_volume(ThresholdModel(), volume, boxes)
    # the reference's rule: every slice of the box is decoded; past an object's end the original box comes back
    assert np.isfinite(plain.scores[0]).sum() == 10 and np.isfinite(plain.scores[1, 1:]).all()
    grown = propagated_box(plain.labels[4] == 1, 1, (64, 64), (256, 256), (256, 256))  # z_mid's mask, +3 px
    np.testing.assert_array_equal(plain.prompts[0, 3], grown)
    first = (boxes[0, [0, 1, 3, 4]] * 4).tolist()  # the box at 256 / 64
    assert plain.prompts[0, 4].tolist() == first  # z_mid
    assert plain.prompts[0, 0].tolist() == first and plain.prompts[0, 7].tolist() == first  # after empty masks
    stopped = segment_volume(ThresholdModel(), volume, boxes, stop_when_empty=True)
    # object 1 (z_mid 4): up 4, 5, 6 (6 is empty: stop), down 3, 2, 1 (1 empty: stop); object 2 (z_mid 5)
    assert np.flatnonzero(np.isfinite(stopped.scores[0])).tolist() == [1, 2, 3, 4, 5, 6]
    assert np.flatnonzero(np.isfinite(stopped.scores[1])).tolist() == [3, 4, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(stopped.labels, plain.labels)  # nothing is lost: the rest was empty anyway
    truth = np.zeros(volume.shape, np.uint8)
    truth[volume == 200] = 1
    truth[volume == 220] = 2
    np.testing.assert_array_equal(plain.labels, truth)


def test_uint16_labels_above_255_objects():
    volume = np.full((3, 64, 64), 200, np.uint8)
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 48, (300, 2)).astype(np.float64)
    boxes = np.column_stack([xy[:, 0], xy[:, 1], np.zeros(300), xy[:, 0] + 16, xy[:, 1] + 16, np.full(300, 2)])
    result = segment_volume(ThresholdModel(), volume, boxes)
    assert result.labels.dtype == np.uint16 and result.labels.max() > 255
    expected = np.zeros((64, 64), np.uint16)
    for k, (x0, y0, _, x1, y1, _) in enumerate(boxes.astype(int), 1):
        expected[y0:y1, x0:x1] = k  # the first slice: each box itself; later objects over earlier
    np.testing.assert_array_equal(result.labels[1], expected)


@pytest.mark.parametrize("shape", [(512, 512), (300, 700), (256, 256), (97, 203)])
@pytest.mark.parametrize("value", [1, 2, 7])
def test_next_box_matches_the_reference_rule(shape, value):
    pytest.importorskip("cv2")
    from medsam_rt.core.preprocess import Preprocessing
    from medsam_rt_export.lite_volume import box_from_previous

    lite = Preprocessing("longest_side", 256, "area", "minmax", (256, 256), "crop_resize", box_scale="longest_side")
    resized = resized_shape(shape, lite)
    rng = np.random.default_rng(shape[0] + value)
    for trial in range(20):
        mask = np.zeros(shape, bool)
        y0, x0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[y0 : y0 + rng.integers(1, 60), x0 : x0 + rng.integers(1, 60)] = True
        mask &= rng.random(shape) > 0.3  # ragged edges: partly covered resized pixels
        if trial == 0:
            mask[:] = False
            mask[-1, -1] = True  # a single corner pixel
        ours = propagated_box(mask, value, shape, resized, (256, 256))
        ref = box_from_previous(mask.astype(np.uint8) * value, resized)
        if ref is None:
            assert ours is None
        else:
            np.testing.assert_array_equal(ours, ref, err_msg=f"{shape} value {value} trial {trial}")


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[0, 0, 0, 10, 10]], r"shape \(N, 6\)"),
        ([[0, 0, 0.5, 10, 10, 2]], "whole slice indices"),
        ([[0, 0, 3, 10, 10, 2]], "z_min <= z_max"),
        ([[0, 0, 0, 10, 10, 4]], r"<= 3 \(slice indices"),
        ([[10, 0, 0, 5, 10, 1]], "inverted"),
        ([[0, 0, 0, 70, 10, 1]], "outside the 64x64"),
        ([[0, 0, 0, 10, np.nan, 1]], "NaN"),
        ([], r"N >= 1"),
    ],
)
def test_box3d_errors(boxes, message):
    with pytest.raises(InvalidBoxError, match=message):
        validate_boxes3d(boxes, (4, 64, 64))


def test_volume_errors(lite):
    with pytest.raises(InvalidImageError, match=r"\(D, H, W\)"):
        lite.segment_volume(np.zeros((64, 64), np.uint8), [0, 0, 0, 10, 10, 0])
    with pytest.raises(InvalidBoxError, match="under one pixel"):  # 10.1..10.3 px at 256/4096: 0..0 after flooring
        lite.segment_volume(np.zeros((1, 4096, 4096), np.uint8), [10.1, 10, 0, 10.3, 20, 0])

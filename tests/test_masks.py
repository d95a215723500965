"""Masks in O(boundary), exact, stored as crops: the band path against the dense float64 chain, bit for bit; label
images, the .npz layout and the writers for many objects."""

from __future__ import annotations

import dataclasses
import json

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medsam_rt import MedSAM
from medsam_rt.core.masks import LabelOverflowError, MaskCrop, MaskFormatError, Masks, label_dtype
from medsam_rt.core.postprocess import AxisTaps, UpscaleChain, _bilinear_window, axis_matrix, axis_taps, chain, sigmoid
from medsam_rt.core.preprocess import Preprocessing, resized_shape
from medsam_rt.core.resample import bilinear_matrix
from medsam_rt.io.results import read_npz
from medsam_rt.tools.cli import main
from medsam_rt_export.checkpoints import MEDSAM_ORIGINAL_PREPROCESSING
from medsam_rt_export.lite import LITE_PREPROCESSING

HF = Preprocessing(  # SamImageProcessor's defaults: longest side 1024, pad to 1024, transformers' postprocessing
    resize="longest_side",
    size=1024,
    interpolation="bilinear",
    normalize="rescale_mean_std",
    pad_size=(1024, 1024),
    postprocess="upscale_crop_resize",
)
RECIPES = {
    "upscale_crop_resize": HF,
    "crop_resize": Preprocessing.from_dict(LITE_PREPROCESSING),
    "resize": Preprocessing.from_dict(MEDSAM_ORIGINAL_PREPROCESSING),
}
# many sizes and aspect ratios: 1-pixel-wide and -tall images, extreme downscales (256 logits to a few pixels),
# odd sizes, enlargements
SIZES = [(1, 1), (1, 700), (700, 1), (3, 2000), (257, 3), (5, 5), (17, 300), (64, 64), (97, 1203), (300, 457)]
SIZES += [(512, 512), (1500, 1100), (2048, 97)]


def _chain(recipe: str, original: tuple[int, int], threshold: float = 0.0) -> UpscaleChain:
    p = dataclasses.replace(RECIPES[recipe], mask_threshold=threshold)
    return chain(p, resized_shape(original, p), original)


def _logits(kind: str, seed: int, t: float = 0.0) -> np.ndarray:
    """float32 (256, 256) low-res logits of a few shapes a decoder gives, and edge cases."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:256, :256].astype(np.float64)
    if kind == "blobs":  # smooth, decoder-like: a few objects, logits within +-20
        v = np.full((256, 256), -12.0)
        for cy, cx, r in rng.uniform([0, 0, 3], [256, 256, 70], (3, 3)):
            v = np.maximum(v, 0.4 * (r - np.hypot(y - cy, x - cx)))
        v += rng.normal(0, 0.3, v.shape)
    elif kind == "noise":
        v = rng.standard_normal((256, 256)) * 4
    elif kind == "at threshold":  # integers around the threshold: many logits exactly at it
        v = np.round(rng.standard_normal((256, 256)) * 1.5)
    elif kind == "one cell":
        v = np.full((256, 256), -5.0)
        v[rng.integers(256), rng.integers(256)] = 3.0
    elif kind == "edges":  # an object touching the borders of the low-res frame
        v = 0.3 * (60 - np.minimum(np.minimum(x, y), np.minimum(255 - x, 255 - y)) - 20)
    elif kind == "inside":
        v = np.full((256, 256), 2.5)
    elif kind == "outside":
        v = np.full((256, 256), -2.5)
    else:  # "threshold": every logit exactly at the threshold: nothing is inside
        v = np.zeros((256, 256))
    return (v + t).astype(np.float32)


KINDS = ["blobs", "noise", "at threshold", "one cell", "edges", "inside", "outside", "threshold"]


def _assert_exact(ch: UpscaleChain, logits: np.ndarray) -> MaskCrop:
    crop = ch.mask_crop(logits)
    ref = ch.reference_mask(logits)
    np.testing.assert_array_equal(crop.dense(ch.original_size), ref)
    tight = MaskCrop.from_dense(ref)
    assert (crop.y0, crop.x0, crop.shape) == (tight.y0, tight.x0, tight.shape)
    assert crop.area == int(ref.sum()) and not crop.mask.flags.writeable
    return crop


# -- the tap tables ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size, in_size", [(1, 256), (5, 256), (256, 256), (4096, 256), (97, 1024), (3, 7)])
def test_bilinear_taps_are_the_resize_matrix(out_size, in_size):
    taps = AxisTaps.from_window(*_bilinear_window(out_size, in_size))
    np.testing.assert_array_equal(taps.dense(in_size), bilinear_matrix(out_size, in_size))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("original", [(1, 1), (300, 700), (4096, 4096), (3, 10000)])
def test_chain_taps_are_convex_and_small(recipe, original):
    p = RECIPES[recipe]
    resized = resized_shape(original, p)
    for axis in (0, 1):
        taps = axis_taps(p.postprocess, 256, p.pad_size[axis], resized[axis], original[axis])
        assert (taps.weight >= 0).all() and np.abs(taps.weight.sum(axis=1) - 1).max() < 1e-14
        assert taps.index.shape[1] <= (3 if recipe == "upscale_crop_resize" else 2)
        assert (np.diff(taps.first) >= 0).all() and (np.diff(taps.last) >= 0).all()
        m32 = axis_matrix(p.postprocess, 256, p.pad_size[axis], resized[axis], original[axis])
        np.testing.assert_allclose(taps.dense(256), m32, atol=1e-7)  # the float32 BLAS path's matrix


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("original", [(300, 457), (37, 1001), (2000, 3)])
def test_exact_chain_is_torch_interpolate_in_float64(recipe, original):
    p = RECIPES[recipe]
    resized = resized_shape(original, p)
    low = _logits("blobs", 3)
    t = torch.from_numpy(low[None, None].astype(np.float64))
    if recipe == "upscale_crop_resize":
        t = F.interpolate(t, size=p.pad_size, mode="bilinear", align_corners=False)[..., : resized[0], : resized[1]]
    elif recipe == "crop_resize":
        t = t[..., : resized[0], : resized[1]]
    ref = F.interpolate(t, size=original, mode="bilinear", align_corners=False)[0, 0].numpy()
    ch = chain(p, resized, original)
    np.testing.assert_allclose(ch.dense(low), ref, rtol=0, atol=1e-12)
    assert ch(low[None]).dtype == np.float32
    np.testing.assert_array_equal(ch(low[None])[0], ch.dense(low).astype(np.float32))


# -- masks in O(boundary) equal the dense float64 chain, bit for bit --------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("original", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_band_masks_equal_the_dense_float64_chain(recipe, original):
    for threshold in (0.0, 0.7, -1.25):
        ch = _chain(recipe, original, threshold)
        for i, kind in enumerate(KINDS):
            crop = _assert_exact(ch, _logits(kind, seed=i + original[0], t=threshold))
            if kind in ("outside", "threshold"):
                assert crop.shape == (0, 0) and crop.bounding_box == (0, 0, 0, 0)
            if kind == "inside":
                assert (crop.y0, crop.x0, crop.shape) == (0, 0, original) and crop.mask.all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_band_masks_exact_at_4096_and_for_boxes_anywhere(recipe):
    ch = _chain(recipe, (4096, 3000))
    for seed in range(3):
        _assert_exact(ch, _logits("blobs", seed))
    _assert_exact(ch, _logits("at threshold", 9))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_non_finite_logits_decide_like_the_dense_chain():
    ch = _chain("upscale_crop_resize", (300, 457))
    low = _logits("blobs", 1)
    low[10:20, 10:20] = np.inf
    low[30:40, 100:110] = -np.inf
    low[50:52, 50:52] = np.nan
    low[80, 80] = 1e-30  # positive, far below the float64 "tiny" bound: decided by the band
    _assert_exact(ch, low)


def test_exact_masks_differ_from_float32_blas_only_within_rounding_of_the_threshold():
    """Today's dense path (float32 rows @ logits @ cols.T, BLAS) agrees with the exact masks except where its
    float32 logit is within rounding of the threshold; how often that happens is reported here (and in
    benchmarks/masks.py)."""
    differ = total = 0
    for recipe in RECIPES:
        p = RECIPES[recipe]
        for original in [(300, 457), (512, 512), (2048, 97)]:
            resized = resized_shape(original, p)
            rows = axis_matrix(p.postprocess, 256, p.pad_size[0], resized[0], original[0])
            cols = axis_matrix(p.postprocess, 256, p.pad_size[1], resized[1], original[1])
            ch = chain(p, resized, original)
            for kind in ("blobs", "noise"):
                low = _logits(kind, 5)
                blas = rows @ low @ cols.T
                exact = ch.dense(low)
                d = (blas > 0) != ch.mask_crop(low).dense(original)
                assert not (d & (np.abs(exact) > 1e-4)).any(), (recipe, original, kind)
                differ, total = differ + int(d.sum()), total + d.size
    print(f"float32 BLAS vs exact: {differ} of {total} pixels differ ({differ / total:.2e})")
    assert differ / total < 1e-4


# -- label images, areas, bounding boxes --------------------------------------------------------------------------


def _masks_of(ch: UpscaleChain, lows: list[np.ndarray]) -> Masks:
    return Masks(
        ch.original_size,
        [ch.mask_crop(low) for low in lows],
        logits_in=lambda k, rows, cols: ch.window(lows[k], rows, cols),
    )


def _reference_labels(ch: UpscaleChain, lows: list[np.ndarray]) -> np.ndarray:
    """Per pixel, the mask with the highest exact logit among those holding it (the first on ties)."""
    score = np.stack([np.where(ch.reference_mask(low), ch.dense(low), -np.inf) for low in lows])
    inside = np.isfinite(score).any(axis=0)
    return np.where(inside, score.argmax(axis=0) + 1, 0)


def test_label_image_overlaps_go_to_the_most_probable_mask_first_on_ties():
    ch = _chain("upscale_crop_resize", (400, 333))
    lows = [_logits("blobs", s) for s in range(5)]
    lows.append(lows[2].copy())  # identical to mask 3: ties everywhere, mask 3 keeps them
    masks = _masks_of(ch, lows)
    labels = masks.label_image()
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, _reference_labels(ch, lows))
    assert not (labels == 6).any() and (labels == 3).any()
    np.testing.assert_array_equal(masks.areas(), [int(ch.reference_mask(low).sum()) for low in lows])
    for (x0, y0, x1, y1), low in zip(masks.bounding_boxes(), lows, strict=True):
        ys, xs = np.nonzero(ch.reference_mask(low))
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # without logits (masks read back from a file) overlaps go to the first mask
    plain = Masks(masks.image_size, masks.crops).label_image()
    first = np.zeros_like(plain)
    for k, m in reversed(list(enumerate(masks.dense(), 1))):
        first[m] = k
    np.testing.assert_array_equal(plain, first)


def test_label_image_blocks_give_the_same_labels(monkeypatch):
    """Row blocks (bounded memory for huge images) give the labels of one pass over the whole image."""
    import medsam_rt.core.masks as masks_module

    ch = _chain("crop_resize", (700, 500))
    lows = [_logits("blobs", s) for s in range(4)]
    whole = _masks_of(ch, lows).label_image()
    monkeypatch.setattr(masks_module, "_LABEL_BLOCK", 500 * 7)  # 7 rows per block
    np.testing.assert_array_equal(_masks_of(ch, lows).label_image(), whole)
    np.testing.assert_array_equal(whole, _reference_labels(ch, lows))


def test_labels_above_255_are_uint16_and_above_65535_refused():
    rng = np.random.default_rng(0)
    crops = [MaskCrop(int(y), int(x), rng.random((3, 4)) < 0.7) for y, x in rng.integers(0, 95, (300, 2))]
    masks = Masks((100, 100), crops)
    labels = masks.label_image()
    assert labels.dtype == np.uint16 and labels.max() == max(k for k, c in enumerate(crops, 1) if c.area)
    expected = np.zeros((100, 100), np.uint16)
    for k, c in reversed(list(enumerate(crops, 1))):
        c.paste(expected, k)
    np.testing.assert_array_equal(labels, expected)
    assert label_dtype(255) == np.uint8 and label_dtype(256) == label_dtype(65535) == np.uint16
    with pytest.raises(LabelOverflowError, match="65536 masks.*65535"):
        label_dtype(65536)
    with pytest.raises(LabelOverflowError):
        Masks((4, 4), [MaskCrop.empty()] * 65536).label_image()


def test_mask_crops_refuse_what_is_not_a_mask():
    with pytest.raises(MaskFormatError, match="2-D bool"):
        MaskCrop(0, 0, np.zeros((2, 2), np.uint8))
    with pytest.raises(MaskFormatError, match="outside the 4x4 image"):
        Masks((4, 4), [MaskCrop(3, 0, np.ones((2, 2), bool))])
    with pytest.raises(MaskFormatError, match="inconsistent"):
        Masks.from_arrays({**Masks((4, 4), [MaskCrop(0, 0, np.ones((2, 2), bool))]).to_arrays(), "crops": [True]})


def test_npz_arrays_round_trip():
    ch = _chain("resize", (123, 77))
    lows = [_logits(kind, 2) for kind in ("blobs", "outside", "one cell", "inside")]
    masks = _masks_of(ch, lows)
    arrays = masks.to_arrays()
    assert str(arrays["mask_format"]) == "crops" and arrays["crops"].size == sum(c.mask.size for c in masks)
    back = Masks.from_arrays(arrays)
    np.testing.assert_array_equal(back.dense(), masks.dense())
    assert [(c.y0, c.x0, c.shape) for c in back] == [(c.y0, c.x0, c.shape) for c in masks]
    np.testing.assert_array_equal(Masks.from_arrays(arrays, select=[0, 3]).dense(), masks.dense()[[0, 3]])


# -- the facade and the writers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return MedSAM.load(tiny_dir)


def test_segment_gives_exact_crops_dense_masks_and_probs(tiny):
    image = np.random.default_rng(4).integers(0, 256, (300, 457, 3), dtype=np.uint8)
    res = tiny.segment(tiny.embed(image), [[20, 30, 300, 250], [200, 10, 450, 290], [0, 0, 457, 300]])
    ch = res.upscale
    for k, low in enumerate(res.low_res_logits):
        np.testing.assert_array_equal(res.crops[k].dense((300, 457)), ch.reference_mask(low))
    np.testing.assert_array_equal(res.masks, res.crops.dense())
    exact = np.stack([ch.dense(low) for low in res.low_res_logits])
    np.testing.assert_array_equal(res.probs, sigmoid(exact.astype(np.float32)))
    np.testing.assert_array_equal(res.label_image(), _reference_labels(ch, list(res.low_res_logits)))


def test_lite_masks_are_exact_and_small(lite_dir):
    from medsam_rt.tools.samples import ellipse_phantom

    model = MedSAM.load(lite_dir, precision="fp32")
    ph = ellipse_phantom(2048, 1536, seed=3)
    res = model.segment(model.embed(ph.image), ph.boxes)
    for k, low in enumerate(res.low_res_logits):
        np.testing.assert_array_equal(res.crops[k].dense((2048, 1536)), res.upscale.reference_mask(low))
        assert res.crops[k].mask.size < 0.5 * 2048 * 1536  # a crop, not the image


def test_many_boxes_write_16_bit_png_nifti_and_npz(tiny, tiny_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    xy = rng.integers(0, 60, (260, 2))
    boxes = np.concatenate([xy, xy + rng.integers(4, 20, (260, 2))], axis=1).clip(0, [80, 64, 80, 64])
    (tmp_path / "boxes.csv").write_text("".join(",".join(map(str, b)) + "\n" for b in boxes))
    expected = tiny.segment(tiny.embed(image), boxes)
    argv = ["segment", str(tiny_dir), str(tmp_path / "img.png"), "--boxes", str(tmp_path / "boxes.csv"), "--quiet"]
    for out in ("m.png", "m.nii.gz"):
        assert main([*argv, "--out", str(tmp_path / out)]) == 0  # no 255-box refusal
    assert main([*argv, "--out", str(tmp_path / "m.npz"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["area_px"] for m in report["masks"]] == expected.crops.areas().tolist()
    png = Image.open(tmp_path / "m.png")
    assert png.mode == "I;16"
    labels = expected.label_image()
    assert labels.dtype == np.uint16 and labels.max() > 255
    np.testing.assert_array_equal(np.asarray(png), labels)
    nii = nibabel.load(tmp_path / "m.nii.gz")
    assert nii.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(nii.dataobj)[:, :, 0].T, labels)
    saved = read_npz(tmp_path / "m.npz")
    np.testing.assert_array_equal(saved.dense(), expected.masks)
    np.testing.assert_array_equal(saved.label, np.arange(1, 261))


def test_dense_npz_on_request_and_old_files_read(tiny, tmp_path):
    from medsam_rt.io.formats import read_scan
    from medsam_rt.io.results import segment_scan, write_result

    image = np.random.default_rng(2).integers(0, 256, (50, 70), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    scan = read_scan(tmp_path / "img.png")
    results = segment_scan(tiny, scan, {0: np.array([[5, 5, 40, 30], [20, 10, 69, 49]])}, None)
    write_result(tmp_path / "d.npz", scan, results, dense_npz=True)
    z = np.load(tmp_path / "d.npz")
    assert str(z["mask_format"]) == "dense" and z["masks"].shape == (2, 50, 70)
    np.testing.assert_array_equal(read_npz(tmp_path / "d.npz").dense(), results[0].masks.dense())
    old = {k: z[k] for k in ("masks", "scores", "boxes", "slice", "label")}  # before crops: no mask_format
    np.savez(tmp_path / "old.npz", **old)
    np.testing.assert_array_equal(read_npz(tmp_path / "old.npz").dense(), z["masks"])
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(MaskFormatError):
        read_npz(tmp_path / "foreign.npz")

"""Preprocessing and postprocessing mirrored against transformers' SamImageProcessor / post_process_masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import CUSTOM_PROCESSOR, pil_image_processor, rng_image, seed_processor
from PIL import Image

from medsam_rt.core.postprocess import upscale_logits
from medsam_rt.core.preprocess import (
    Preprocessing,
    preprocess_image,
    resized_shape,
    scale_boxes,
    to_rgb_uint8,
    validate_boxes,
)
from medsam_rt.core.resample import bilinear_matrix
from medsam_rt.errors import InvalidBoxError, InvalidImageError
from medsam_rt_export.checkpoints import MEDSAM_ORIGINAL_PREPROCESSING
from medsam_rt_export.hf import preprocessing_from_processor
from medsam_rt_export.lite import LITE_PREPROCESSING

CONFIGS = {"default": {}, "custom": CUSTOM_PROCESSOR}


def _pair(name):
    hf = pil_image_processor(**CONFIGS[name])
    return hf, Preprocessing.from_dict(preprocessing_from_processor(hf.to_dict()))


def _hf_pixels(hf, image):
    out = hf(
        images=image, return_tensors="np", input_data_format="channels_last" if isinstance(image, np.ndarray) else None
    )
    return out["pixel_values"], tuple(int(v) for v in out["reshaped_input_sizes"][0])


SHAPES = {
    "rgb": (300, 457, 3),
    "odd aspect": (37, 1001, 3),
    "extreme aspect": (2000, 3, 3),
    "one pixel wide": (700, 1, 3),
    "one pixel tall": (1, 333, 3),
    "large": (1500, 1100, 3),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
def test_rgb_arrays_match_sam_image_processor(config, shape):
    hf, p = _pair(config)
    img = rng_image(shape, seed=shape[0])
    ref, ref_size = _hf_pixels(hf, img)
    ours, size = preprocess_image(to_rgb_uint8(img), p)
    assert size == ref_size
    assert ours.shape == ref.shape == (1, 3, 1024, 1024)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_pil_modes_match_processor_conversion(config, mode):
    """Gray and RGBA arrays give what SamImageProcessor gives for the same PIL image (it converts to RGB)."""
    hf, p = _pair(config)
    rgba = np.dstack([rng_image((200, 310, 3), seed=3), rng_image((200, 310), seed=4)])
    pil = Image.fromarray(rgba, "RGBA")
    pil = pil.convert(mode) if mode != "RGBA" else pil
    hf_input = pil
    if mode == "RGBA" and transformers.__version__.startswith("4."):
        # transformers 4.x drops alpha; medsam-rt composites onto white as transformers >= 5 does
        hf_input = Image.alpha_composite(Image.new("RGBA", pil.size, "white"), pil).convert("RGB")
    ref, ref_size = _hf_pixels(hf, hf_input)
    ours, size = preprocess_image(to_rgb_uint8(np.asarray(pil.convert("RGB") if mode == "P" else pil)), p)
    assert size == ref_size
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_uint16_is_minmax_scaled_to_8_bit():
    img16 = rng_image((64, 80), np.uint16)
    lo, hi = int(img16.min()), int(img16.max())
    expected = np.rint((img16.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)
    out = to_rgb_uint8(img16)
    assert out.dtype == np.uint8 and out.shape == (64, 80, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.min() == 0 and out.max() == 255
    # 16-bit through the full HF recipe equals the processor fed the 8-bit version
    hf, p = _pair("default")
    ref, _ = _hf_pixels(hf, np.repeat(expected[:, :, None], 3, axis=2))
    np.testing.assert_allclose(preprocess_image(out, p)[0], ref, atol=1e-5, rtol=0)


def test_rgba_is_composited_on_white():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [0, 0, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgba)[0], [[200, 100, 0], [255, 255, 255], [127, 127, 127]])
    rgba16 = np.array([[[1000, 0, 0, 65535], [0, 0, 0, 0]]], np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(rgba16)[0], [[255, 0, 0], [255, 255, 255]])


def test_intake_edge_cases():
    assert not to_rgb_uint8(np.full((5, 7), 1234.5)).any()  # constant image -> zeros, no division by zero
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[True, False]]))[..., 1], [[255, 0]])
    f = np.linspace(-1, 3, 12, dtype=np.float32).reshape(3, 4)
    assert to_rgb_uint8(f)[0, 0, 0] == 0 and to_rgb_uint8(f)[2, 3, 2] == 255
    for bad, msg in [
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((4, 5, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 5, 3), np.uint8), "shape"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or Inf"),
        (np.array([["a", "b"]]), "dtype"),
        ([[1, 2], [3, 4]], "numpy array"),
    ]:
        with pytest.raises(InvalidImageError, match=msg):
            to_rgb_uint8(bad)


@pytest.mark.parametrize("size", [(300, 457), (37, 1001), (2000, 3), (1024, 1024)])
def test_box_scaling_matches_sam_processor(size):
    processor = seed_processor()
    boxes = np.array([[0, 0, size[1], size[0]], [1.5, 0.25, size[1] / 2, size[0] / 3]])
    ref = processor._normalize_coordinates(1024, boxes.copy(), size, is_bounding_box=True)
    p = _pair("default")[1]
    ours = scale_boxes(boxes, size, resized_shape(size, p), p)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_box_validation():
    size = (100, 200)  # H, W
    np.testing.assert_array_equal(validate_boxes([0, 0, 200, 100], size), [[0, 0, 200, 100]])
    for bad, msg in [
        ([[1, 2, 3]], "shape"),
        ([], "shape|no boxes"),
        (np.zeros((0, 4)), "no boxes"),
        ([[10, 10, np.nan, 20]], "NaN"),
        ([[10, 10, 5, 20]], "inverted"),
        ([[10, 10, 10, 20]], "zero area"),
        ([[-1, 0, 10, 10]], "outside"),
        ([[0, 0, 201, 10]], "outside"),
        ([[0, 0, 10, 101]], "outside"),
        ("abc", "numbers"),
    ]:
        with pytest.raises(InvalidBoxError, match=msg):
            validate_boxes(bad, size)


@pytest.mark.parametrize("out_size,in_size", [(1024, 256), (256, 1024), (7, 3), (3, 7), (1, 5), (5, 1), (1000, 1000)])
def test_bilinear_matrix_matches_torch(out_size, in_size):
    x = np.random.default_rng(0).standard_normal((in_size, 3))
    ref = F.interpolate(torch.from_numpy(x.T[None]), size=out_size, mode="linear", align_corners=False)[0].numpy().T
    np.testing.assert_allclose(bilinear_matrix(out_size, in_size) @ x, ref, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("original", [(300, 457), (37, 1001), (700, 1), (2000, 1500), (1024, 1024)])
def test_upscale_matches_post_process_masks(config, original):
    hf, p = _pair(config)
    resized = resized_shape(original, p)
    low = np.random.default_rng(1).standard_normal((3, 256, 256)).astype(np.float32) * 4
    ours = upscale_logits(low, p, resized, original)
    # exact against torch in float64; float32 torch rounds twice (two resizes), so allow its rounding noise
    for dtype, atol in ((np.float64, 1e-5), (np.float32, 1e-3)):
        masks = [torch.from_numpy(low[:, None].astype(dtype))]
        ref = hf.post_process_masks(masks, [original], [resized], binarize=False)[0][:, 0].numpy()
        assert ours.shape == ref.shape == (3, *original)
        np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def test_phantom_ground_truth_and_dice():
    from medsam_rt.tools.samples import dice, ellipse_phantom

    ph = ellipse_phantom(300, 700, seed=2, dtype=np.uint16)
    mask, box = ph.truth[0], ph.boxes[0]
    assert ph.image.dtype == np.uint16 and ph.image.shape == mask.shape == (300, 700)
    ys, xs = np.nonzero(mask)
    assert box[0] <= xs.min() and box[2] >= xs.max() + 1 and box[1] <= ys.min() and box[3] >= ys.max() + 1
    assert ph.image[mask].mean() > ph.image[~mask].mean() + 0.3 * 65535
    assert dice(mask, mask) == 1.0 and dice(mask, ~mask) == 0.0
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


# --- the rest of the vocabulary: LiteMedSAM's and MedSAM's original recipes, against their references ---

LITE = Preprocessing.from_dict(LITE_PREPROCESSING)  # the recipes the exporter writes into manifests
ORIGINAL = Preprocessing.from_dict(MEDSAM_ORIGINAL_PREPROCESSING)


@pytest.mark.parametrize(
    "shape", [(512, 512), (300, 700), (1800, 600), (97, 203), (64, 64), (33, 41), (1411, 1411), (1, 333), (700, 2)]
)
def test_area_resize_matches_opencv(shape):
    cv2 = pytest.importorskip("cv2")
    from medsam_rt.core.preprocess import resize_uint8

    rgb = to_rgb_uint8(
        rng_image((*shape, 3), seed=shape[1]) ^ np.random.default_rng(0).integers(0, 40, (*shape, 3)).astype(np.uint8)
    )
    h, w = resized_shape(shape, LITE)
    ref = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    ours = resize_uint8(rgb, (h, w), "area")
    assert ours.shape == ref.shape == (h, w, 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # OpenCV enlarges in 11-bit fixed point (with SIMD-specific truncations) and we round once, in float64:
    # at most one gray level apart, and only on a minority of pixels
    assert diff.max() <= 1 and (diff == 0).mean() > 0.85, (diff.max(), (diff == 0).mean())


def test_minmax_and_lite_pipeline_match_cvpr24_reference():
    cv2 = pytest.importorskip("cv2")
    rgb = to_rgb_uint8(rng_image((300, 700, 3), seed=9))
    raw = cv2.resize(rgb, (256, 110), interpolation=cv2.INTER_AREA)
    img = (raw - raw.min()) / np.clip(raw.max() - raw.min(), a_min=1e-8, a_max=None)
    ref = np.pad(img, ((0, 146), (0, 0), (0, 0))).transpose(2, 0, 1)[None].astype(np.float32)
    ours, size = preprocess_image(rgb, LITE)
    assert size == (110, 256)
    one_level = 1.0 / (int(raw.max()) - int(raw.min()))  # the resize may differ by one gray level (see above)
    np.testing.assert_allclose(ours, ref, atol=one_level + 1e-6)
    assert (np.abs(ours - ref) < 1e-6).mean() > 0.9


@pytest.mark.parametrize("original", [(300, 700), (97, 203), (1800, 600), (64, 64)])
def test_lite_boxes_match_reference_truncation(original):
    boxes = np.array([[10.7, 20.2, 60.9, 63.99], [0, 0, original[1], original[0]]])
    ratio = 256 / max(original)
    ref = np.array([[int(v * ratio) for v in box] for box in boxes], np.float32)
    np.testing.assert_array_equal(scale_boxes(boxes, original, resized_shape(original, LITE), LITE), ref)


def test_original_medsam_boxes_scale_per_axis():
    boxes = np.array([[10.5, 20.25, 300.0, 250.0]])
    ref = boxes / np.array([700, 300, 700, 300]) * 1024
    size = (300, 700)
    np.testing.assert_allclose(scale_boxes(boxes, size, resized_shape(size, ORIGINAL), ORIGINAL), ref, rtol=1e-6)
    assert resized_shape(size, ORIGINAL) == (1024, 1024)


@pytest.mark.parametrize(
    "p,original", [(LITE, (300, 700)), (LITE, (97, 203)), (ORIGINAL, (300, 700)), (ORIGINAL, (64, 64))]
)
def test_crop_resize_and_resize_postprocess_match_torch(p, original):
    low = np.random.default_rng(2).standard_normal((2, 256, 256)).astype(np.float32) * 3
    resized = resized_shape(original, p)
    t = torch.from_numpy(low[:, None].astype(np.float64))
    if p.postprocess == "crop_resize":  # CVPR24 LiteMedSAM: crop at low resolution, then resize
        t = t[..., : resized[0], : resized[1]]
    ref = F.interpolate(t, size=original, mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(upscale_logits(low, p, resized, original), ref, atol=1e-4)


def test_square_bicubic_is_close_to_medsam_skimage_resize():
    """MedSAM's original script resizes with skimage (order 3, anti-aliasing); medsam-rt uses Pillow's bicubic
    (the runtime has no scipy); this bounds the difference."""
    transform = pytest.importorskip("skimage.transform")
    from medsam_rt.core.preprocess import resize_uint8

    for shape in [(512, 512), (300, 700), (1400, 1100)]:
        rgb = to_rgb_uint8(rng_image((*shape, 3), seed=1))
        ref = transform.resize(
            rgb, (1024, 1024), order=3, preserve_range=True, mode="constant", anti_aliasing=True
        ).astype(np.uint8)
        ours = resize_uint8(rgb, (1024, 1024), "bicubic")
        # skimage truncates to uint8 (mean ~0.5 level lower) and, in mode="constant", darkens the outermost
        # pixels with its zero padding; away from the border 99 % of pixels agree within one gray level
        diff = np.abs(ours.astype(int) - ref.astype(int))[4:-4, 4:-4]
        assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 1, (shape, diff.mean(), diff.max())


def test_vocabulary_rejects_unknown_entries():
    from medsam_rt.errors import ModelDirError

    base = LITE.to_dict()
    for key, value, msg in [
        ("interpolation", "lanczos4", "interpolation='lanczos4' unsupported"),
        ("resize", "shortest_side", "resize='shortest_side'"),
        ("normalize", "zscore", "normalize='zscore'"),
        ("box_round", "ceil", "box_round='ceil'"),
        ("postprocess", "magic", "postprocess='magic'"),
        ("size", 512, "inconsistent"),
    ]:
        with pytest.raises(ModelDirError, match=msg):
            Preprocessing.from_dict({**base, key: value})
    with pytest.raises(ModelDirError, match="resize='square'"):
        Preprocessing.from_dict({**base, "postprocess": "resize"})
    with pytest.raises(ModelDirError, match="malformed"):
        Preprocessing.from_dict({k: v for k, v in base.items() if k != "size"})

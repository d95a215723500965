"""End-to-end: medsam_rt on ONNX Runtime vs the seed's PyTorch path (SamProcessor + SamModel + post_process_masks)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from conftest import rng_image, seed_path, seed_processor
from PIL import Image

from medsam_rt import (
    EmbeddingMismatchError,
    ImageEmbedding,
    InvalidBoxError,
    InvalidImageError,
    MedSAM,
    ModelDirError,
    ProviderUnavailableError,
)


@pytest.fixture(scope="module")
def custom_model(custom_dir):
    return MedSAM.load(custom_dir)


@pytest.mark.parametrize("shape", [(300, 457, 3), (512, 200), (97, 1203, 4)], ids=["rgb", "gray", "rgba-wide"])
def test_matches_seed_pytorch_path(custom_model, hf_reference, shape):
    processor, sam = hf_reference
    image = rng_image(shape, seed=7)
    h, w = shape[:2]
    boxes = [[0.1 * w, 0.1 * h, 0.6 * w, 0.7 * h], [0.3 * w, 0.2 * h, 0.95 * w, 0.9 * h], [0, 0, w, h]]
    pil = Image.fromarray(image)  # the seed hands PIL images to SamProcessor, which converts to RGB
    if image.ndim == 3 and image.shape[2] == 4 and transformers.__version__.startswith("4."):
        pil = Image.alpha_composite(Image.new("RGBA", pil.size, "white"), pil)  # 4.x would drop alpha
    ref_logits, ref_scores = seed_path(processor, sam, pil, boxes)
    res = custom_model.segment(custom_model.embed(image), boxes)

    assert res.masks.shape == res.probs.shape == (3, h, w) and res.masks.dtype == bool
    assert res.probs.dtype == np.float32 and res.scores.shape == (3,)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-3)
    np.testing.assert_allclose(res.probs, 1 / (1 + np.exp(-ref_logits)), atol=1e-3)
    decided = np.abs(ref_logits) > 1e-2  # masks agree wherever the reference is not on the threshold
    np.testing.assert_array_equal(res.masks[decided], (ref_logits > 0)[decided])
    assert 0.02 < res.masks.mean() < 0.98, "random weights should still give non-trivial masks"


def test_default_processor_export_matches_seed(tiny_dir, tiny_source):
    processor = seed_processor()
    model = MedSAM.load(tiny_dir)
    image = rng_image((240, 320, 3), seed=11)
    boxes = [[20, 30, 200, 220], [150, 10, 310, 120]]
    ref_logits, ref_scores = seed_path(processor, tiny_source.model, Image.fromarray(image), boxes)
    res = model.segment(model.embed(image), boxes)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-3)
    decided = np.abs(ref_logits) > 1e-2
    np.testing.assert_array_equal(res.masks[decided], (ref_logits > 0)[decided])


def test_many_boxes_per_call_equal_one_box_per_call(tiny_dir):
    model = MedSAM.load(tiny_dir)
    emb = model.embed(rng_image((200, 260, 3), seed=2))
    boxes = np.array([[10, 10, 100, 120], [50, 60, 250, 190], [0, 0, 260, 200], [120.5, 30.25, 180.75, 90.5]])
    batched = model.segment(emb, boxes)
    for k, box in enumerate(boxes):
        single = model.segment(emb, box)
        np.testing.assert_allclose(single.probs[0], batched.probs[k], atol=1e-5)
        np.testing.assert_allclose(single.scores[0], batched.scores[k], atol=1e-5)


def test_path_inputs_and_16_bit_png(tiny_dir, tmp_path):
    model = MedSAM.load(tiny_dir)
    img16 = rng_image((120, 90), np.uint16)
    Image.fromarray(img16).save(tmp_path / "scan16.png")
    from_file = model.embed(tmp_path / "scan16.png")
    from_array = model.embed(img16)
    assert from_file.original_size == (120, 90)
    np.testing.assert_array_equal(from_file.embeddings, from_array.embeddings)


def test_label_image_overlaps_go_to_most_probable_box(tiny_dir):
    model = MedSAM.load(tiny_dir)
    res = model.segment(model.embed(rng_image((100, 100, 3))), [[0, 0, 80, 80], [20, 20, 100, 100]])
    labels = res.label_image()
    assert labels.dtype == np.uint8 and labels.shape == (100, 100)
    assert set(np.unique(labels)) <= {0, 1, 2}
    both = res.masks[0] & res.masks[1]
    expected = np.where(res.probs[0] >= res.probs[1], 1, 2)
    np.testing.assert_array_equal(labels[both], expected[both])
    np.testing.assert_array_equal(labels == 0, ~res.masks.any(axis=0))


def test_errors_are_typed_and_informative(tiny_dir, custom_dir, tmp_path):
    model = MedSAM.load(tiny_dir)
    other = MedSAM.load(custom_dir)
    emb = model.embed(rng_image((64, 64, 3)))
    with pytest.raises(EmbeddingMismatchError, match="another|not by this model"):
        other.segment(emb, [0, 0, 10, 10])
    with pytest.raises(EmbeddingMismatchError):
        model.segment(np.zeros((1, 32, 64, 64), np.float32), [0, 0, 10, 10])
    with pytest.raises(InvalidBoxError, match="outside the 64x64 image"):
        model.segment(emb, [0, 0, 65, 10])
    with pytest.raises(InvalidBoxError, match="NaN"):
        model.segment(emb, [0, np.nan, 5, 10])
    with pytest.raises(InvalidImageError, match="not found"):
        model.embed(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidImageError, match="cannot read image"):
        model.embed(tmp_path / "notes.png")
    with pytest.raises(InvalidImageError, match="empty"):
        model.embed(np.zeros((0, 10), np.uint8))
    for exc in (EmbeddingMismatchError, InvalidBoxError, InvalidImageError, ModelDirError):
        assert issubclass(exc, ValueError)
    assert isinstance(emb, ImageEmbedding)


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        MedSAM.load(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="manifest.json is missing"):
        MedSAM.load(tmp_path)
    with pytest.raises(ModelDirError, match="no int8 variant that passed its gate; available: fp32, fp16"):
        MedSAM.load(tiny_dir, precision="int8")
    with pytest.raises(ModelDirError, match="unknown precision 'fp8'"):
        MedSAM.load(tiny_dir, precision="fp8")
    with pytest.raises(ProviderUnavailableError, match="available: .*CPUExecutionProvider"):
        MedSAM.load(tiny_dir, device="cuda")
    with pytest.raises(ProviderUnavailableError, match="unknown device"):
        MedSAM.load(tiny_dir, device="tpu")
    assert MedSAM.load(tiny_dir, device="auto").device == "cpu"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    enc = broken / "encoder.fp32.onnx"
    enc.write_bytes(enc.read_bytes()[:1000])
    with pytest.raises(ModelDirError, match="encoder.fp32.onnx has 1000 bytes.*truncated"):
        MedSAM.load(broken)
    (broken / "manifest.json").write_text('{"format": "medsam-rt", "schema_version": 99}')
    with pytest.raises(ModelDirError, match="schema_version 99"):
        MedSAM.load(broken)

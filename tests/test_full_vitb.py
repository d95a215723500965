"""Full-size MedSAM ViT-B (fixed random weights): export with its parity gate, then the runtime against PyTorch.

Marked ``full``: about 3 minutes and 8 GB of RAM on a 2-core machine. ``make test-full`` / CI run it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import manifest_of, rng_image, seed_path, seed_processor

from medsam_rt import MedSAM

pytestmark = pytest.mark.full


@pytest.fixture(scope="module")
def vitb_dir(tmp_path_factory):
    from medsam_rt_export import export_model

    return export_model(tmp_path_factory.mktemp("full") / "vitb", random_weights=True, arch="vit-base")


def test_vitb_export_contract_and_parity(vitb_dir):
    m = manifest_of(vitb_dir)
    checks = m["parity"]["fp32"]["checks"]
    assert m["parity"]["fp32"]["passed"] and max(c["max_abs_diff"] for c in checks) <= 1e-3
    enc = ort.InferenceSession(str(vitb_dir / "encoder.fp32.onnx"))
    assert enc.get_outputs()[0].shape == [1, 256, 64, 64]
    assert m["graphs"]["encoder"]["fp32"]["bytes"] > 300e6  # 89.7 M parameters in fp32


def test_vitb_runtime_matches_pytorch(vitb_dir):
    from medsam_rt_export.hf import random_source

    sam = random_source("vit-base").model
    processor = seed_processor()
    image = rng_image((400, 560, 3), seed=3)
    boxes = [[40, 50, 300, 350], [200, 30, 540, 300]]
    ref, ref_scores = seed_path(processor, sam, image, boxes)
    model = MedSAM.load(vitb_dir)
    res = model.segment(model.embed(image), boxes)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-3)
    decided = np.abs(ref) > 1e-2
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(res.masks[decided], (ref > 0)[decided])


def test_original_vitb_checkpoint_matches_segment_anything(tmp_path):
    """A random ViT-B built by the PyPI segment-anything package, saved as .pth, exported and checked against it."""
    segment_anything = pytest.importorskip("segment_anything")
    from medsam_rt_export import export_model
    from medsam_rt_export.graphs import segment_anything_decode

    torch.manual_seed(0)
    sam = segment_anything.sam_model_registry["vit_b"](checkpoint=None).eval()
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    out = export_model(tmp_path / "model", str(path))
    assert manifest_of(out)["preprocessing"]["recipe"] == "medsam-original"
    enc = ort.InferenceSession(str(out / "encoder.fp32.onnx"))
    dec = ort.InferenceSession(str(out / "decoder.fp32.onnx"))
    pixels = np.random.default_rng(0).random((1, 3, 1024, 1024), dtype=np.float32)
    boxes = np.float32([[100, 200, 600, 700], [30, 40, 1000, 500]])
    with torch.no_grad():
        ref_emb = sam.image_encoder(torch.from_numpy(pixels))
        ref_logits, ref_iou = segment_anything_decode(
            sam.prompt_encoder, sam.mask_decoder, ref_emb, torch.from_numpy(boxes)
        )
    (emb,) = enc.run(None, {"pixel_values": pixels})
    np.testing.assert_allclose(emb, ref_emb.numpy(), atol=1e-3)
    logits, iou = dec.run(None, {"image_embeddings": ref_emb.numpy(), "boxes": boxes})
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-3)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-3)

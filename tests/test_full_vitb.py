"""Full-size MedSAM ViT-B (fixed random weights): export with its parity gate, then the runtime against PyTorch.

Marked ``full``: about 3 minutes and 8 GB of RAM on a 2-core machine. ``make test-full`` / CI run it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import manifest_of, rng_image

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
    from transformers import SamImageProcessor, SamProcessor

    from medsam_rt_export.sources import random_source

    sam = random_source("vit-base").model
    processor = SamProcessor(SamImageProcessor())
    image = rng_image((400, 560, 3), seed=3)
    boxes = [[40, 50, 300, 350], [200, 30, 540, 300]]
    inputs = processor(images=image, input_boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
        out = sam(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    ref = processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][:, 0].numpy()
    model = MedSAM.load(vitb_dir)
    res = model.segment(model.embed(image), boxes)
    np.testing.assert_allclose(res.scores, out.iou_scores[0, :, 0].numpy(), atol=1e-3)
    decided = np.abs(ref) > 1e-2
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(res.masks[decided], (ref > 0)[decided])

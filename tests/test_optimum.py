"""The optimum baseline row of `medsam-rt bench`: optimum's export of the same SamModel, timed on ONNX Runtime.

optimum-onnx pins transformers < 4.58, so this runs in the transformers-4.57 environment (`make test-tf4`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("optimum.exporters.onnx", reason="optimum-onnx lives in the transformers-4.57 env (make test-tf4)")

from medsam_rt import MedSAM  # noqa: E402
from medsam_rt.tools.bench import optimum_backend  # noqa: E402
from medsam_rt_export.optimum_baseline import export_optimum  # noqa: E402


def test_optimum_export_matches_medsam_rt_embeddings(tiny_dir, tmp_path):
    out = export_optimum(tiny_dir, tmp_path / "optimum")
    assert (out / "vision_encoder.onnx").is_file() and (out / "prompt_encoder_mask_decoder.onnx").is_file()
    embed, segment, extra = optimum_backend(tiny_dir, out, "cpu")
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    state = embed(image)
    ours = MedSAM.load(tiny_dir, precision="fp32").embed(image)
    np.testing.assert_allclose(state[0], ours.embeddings, atol=1e-4)  # the same model, exported twice
    crops = segment(state, np.array([[10.0, 20, 120, 150], [50, 5, 230, 90]]))
    assert len(crops) == 2  # one mask crop per box, inside the original image
    for crop in crops:
        dense = crop.dense((180, 240))
        assert dense.shape == (180, 240) and dense.dtype == bool and dense.sum() == crop.area
    assert extra["graph_mib"] > 0

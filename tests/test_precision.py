"""Precision variants (fp16, int8) and graph optimisation: files, gates, manifest, runtime selection."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import manifest_of, rng_image, run_cli

from medsam_rt import MedSAM, ModelDirError
from medsam_rt.core.manifest import METADATA_PREFIX
from medsam_rt.core.preprocess import Preprocessing
from medsam_rt.errors import ExportError, GateError
from medsam_rt_export import export_model
from medsam_rt_export import parity as parity_mod


@pytest.fixture(scope="session")
def all_dir(tmp_path_factory):
    return export_model(
        tmp_path_factory.mktemp("prec") / "tiny-all", random_weights=True, arch="tiny", precisions="fp32,fp16,int8"
    )


def test_variants_files_and_manifest(all_dir):
    m = manifest_of(all_dir)
    assert m["precisions"] == ["fp32", "fp16", "int8"]
    assert sorted(p.name for p in all_dir.iterdir()) == [
        "check_sample.npz",
        "decoder.fp16.onnx",
        "decoder.fp32.onnx",
        "encoder.fp16.onnx",
        "encoder.fp32.onnx",
        "encoder.int8.onnx",
        "manifest.json",
        "postprocess.onnx",
    ]
    assert m["graphs"]["decoder"]["int8"]["file"] == "decoder.fp32.onnx"  # int8 pairs with the fp32 decoder
    assert m["graphs"]["encoder"]["int8"]["conversion"]["quantized_nodes"] > 0
    fp16 = m["graphs"]["encoder"]["fp16"]["conversion"]
    assert fp16["io"] == "float32" and fp16["kept_fp32_op_types"] == ["Softmax"] and fp16["kept_fp32_nodes"] > 0
    sizes = {p: m["graphs"]["encoder"][p]["bytes"] for p in m["precisions"]}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    for p in ("fp16", "int8"):
        gate = m["parity"][p]["gate"]
        assert gate["passed"] and gate["finite_on_extreme_inputs"] and gate["gated_on_dice"] is False
        assert 0.0 <= gate["min_dice"] <= 1.0 and gate["max_iou_diff"] >= 0 and gate["boxes"] >= 3
    assert m["parity"]["fp16"]["gate"]["max_logit_diff"] < m["parity"]["int8"]["gate"]["max_logit_diff"]


def test_optimisation_is_recorded_and_decomposed_norms_are_gone(all_dir):
    m = manifest_of(all_dir)
    for role in ("encoder", "decoder"):
        opt = m["optimization"][role]
        assert opt["nodes_before"] != opt["nodes_after"] and opt["fused"].get("Gelu", 0) > 0
        # channels-first LayerNorms (neck, mask upscaling) are exported as LayerNormalization, not decomposed
        assert "ReduceMean" not in opt["nodes_after"] and "Sqrt" not in opt["nodes_after"]
        assert "Erf" not in opt["nodes_after"]
    graph = onnx.load(str(all_dir / "encoder.int8.onnx"))
    props = {p.key[len(METADATA_PREFIX) :]: p.value for p in graph.metadata_props}
    assert props["precision"] == "int8" and json.loads(props["parity"])["gate"]["passed"]


def test_runtime_selects_and_runs_variants(all_dir):
    image = rng_image((200, 260, 3), seed=3)
    boxes = [[20, 30, 180, 170], [100, 10, 250, 190]]
    auto = MedSAM.load(all_dir)
    assert auto.precision == "int8"  # the best CPU variant whose gate passed
    results = {p: MedSAM.load(all_dir, precision=p).predict(image, boxes) for p in ("fp32", "fp16", "int8")}
    for p, res in results.items():
        assert np.isfinite(res.probs).all() and res.masks.shape == (2, 200, 260), p
    # fp16 on the CPU provider runs correctly: close to fp32, closer than int8
    d16 = np.abs(results["fp16"].low_res_logits - results["fp32"].low_res_logits).max()
    d8 = np.abs(results["int8"].low_res_logits - results["fp32"].low_res_logits).max()
    assert d16 < 0.05 and d16 < d8


def test_embeddings_of_another_precision_are_refused(all_dir):
    from medsam_rt import EmbeddingMismatchError

    fp32, int8 = MedSAM.load(all_dir, precision="fp32"), MedSAM.load(all_dir, precision="int8")
    emb = int8.embed(rng_image((64, 64)))
    with pytest.raises(EmbeddingMismatchError, match="#int8"):
        fp32.segment(emb, [0, 0, 10, 10])


def test_int8_only_export_and_bad_precision_lists(tmp_path):
    out = export_model(tmp_path / "int8", random_weights=True, arch="tiny", precisions="int8")
    m = manifest_of(out)
    assert m["precisions"] == ["int8"] and "checks" in m["parity"]["fp32"]  # the fp32 baseline is documented
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check_sample.npz", "decoder.fp32.onnx", "encoder.int8.onnx", "manifest.json", "postprocess.onnx"]
    assert MedSAM.load(out).precision == "int8"
    with pytest.raises(ModelDirError, match="no fp32 variant"):
        MedSAM.load(out, precision="fp32")
    for bad in ("fp8", "", "fp32,,bf16"):
        with pytest.raises(ExportError, match="expected a subset of fp32,fp16,int8"):
            export_model(tmp_path / "bad", random_weights=True, arch="tiny", precisions=bad)
    assert not (tmp_path / "bad").exists()


def test_gate_fails_with_numbers(all_dir, monkeypatch):
    m = manifest_of(all_dir)
    p = m["preprocessing"]
    fp32 = {r: all_dir / f"{r}.fp32.onnx" for r in ("encoder", "decoder")}
    fp16 = {r: all_dir / f"{r}.fp16.onnx" for r in ("encoder", "decoder")}
    monkeypatch.setitem(parity_mod.DICE_MIN, "fp16", 1.01)  # a bound no real graph meets
    with pytest.raises(
        GateError, match=r"fp16 gate failed: mask Dice vs fp32 0\.\d+, expected >= 1\.01 \(.*, box \d\)"
    ):
        parity_mod.check_variant("fp16", p, fp32, fp16, gate_dice=True)


def test_gate_catches_non_finite_outputs(all_dir, tmp_path):
    """An encoder that emits NaN must fail the gate on the extreme inputs."""
    from onnx import TensorProto, helper

    nan = helper.make_tensor("nan", TensorProto.FLOAT, [1, 32, 64, 64], [float("nan")] * (32 * 64 * 64))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["image_embeddings"], value=nan)],
        "nan-encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 32, 64, 64])],
    )
    bad = tmp_path / "encoder.nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(bad))
    p = manifest_of(all_dir)["preprocessing"]
    fp32 = {r: all_dir / f"{r}.fp32.onnx" for r in ("encoder", "decoder")}
    with pytest.raises(GateError, match="int8 gate failed: non-finite image_embeddings .*all-zero"):
        parity_mod.check_variant("int8", p, fp32, {"encoder": bad, "decoder": fp32["decoder"]}, gate_dice=False)
    assert Preprocessing.from_dict(p).pad_size == (1024, 1024)


def test_cli_precision_errors(all_dir, tmp_path):
    r = run_cli(
        "export", "--random-weights", "--arch", "tiny", "--precision", "fp32,int4", "--out", str(tmp_path / "x")
    )
    assert r.returncode == 2 and "int4" in r.stderr and r.stderr.count("\n") == 1
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(rng_image((50, 60))).save(tmp_path / "i.png")
    box, out = ("--box", "1,1,30,30"), ("--out", str(tmp_path / "m.png"))
    r = run_cli("segment", str(all_dir), str(tmp_path / "i.png"), *box, *out, "--precision", "fp64")
    assert r.returncode == 2 and "invalid choice: 'fp64'" in r.stderr

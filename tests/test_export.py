"""The exporter: files, contract, metadata, parity gate, atomicity, loading errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import manifest_of

from medsam_rt.core.manifest import METADATA_PREFIX
from medsam_rt.errors import ExportError, ParityError
from medsam_rt_export import export_model
from medsam_rt_export.hf import hf_source, random_source
from medsam_rt_export.parity import check_parity, compare
from medsam_rt_export.pipeline import sha256_file


def test_export_writes_the_contract(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "check_sample.npz",
        "decoder.fp16.onnx",
        "decoder.fp32.onnx",
        "encoder.fp16.onnx",
        "encoder.fp32.onnx",
        "manifest.json",
        "postprocess.onnx",
    ]  # the default precisions: fp32, fp16; the load-time check's sample; the postprocessing graph (GPU masks)
    m = manifest_of(tiny_dir)
    assert m["format"] == "medsam-rt" and m["schema_version"] == 1
    assert m["model"]["random_weights"] is True and "RANDOM WEIGHTS" in m["warning"]
    assert m["model"]["source"] == "random:tiny" and m["model"]["checksum"].startswith("sha256:")
    assert m["opset"] == 18 and {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["versions"])
    assert m["precisions"] == ["fp32", "fp16"]
    for role in ("encoder", "decoder"):
        for precision in ("fp32", "fp16"):
            entry = m["graphs"][role][precision]
            assert entry["sha256"] == sha256_file(tiny_dir / entry["file"])
            assert entry["bytes"] == (tiny_dir / entry["file"]).stat().st_size
    checks = m["parity"]["fp32"]["checks"]
    assert m["parity"]["fp32"]["passed"] and all(c["max_abs_diff"] <= 1e-3 for c in checks)
    cases = {c["case"] for c in checks}
    assert any("N=1" in c for c in cases) and any("N=3" in c for c in cases)
    assert any(c["graph"] == "encoder+decoder" for c in checks)
    assert m["preprocessing"]["interpolation"] == "bilinear" and m["preprocessing"]["pad_size"] == [1024, 1024]


def test_graph_io_and_metadata(tiny_dir):
    m = manifest_of(tiny_dir)
    enc = ort.InferenceSession(str(tiny_dir / "encoder.fp32.onnx"))
    dec = ort.InferenceSession(str(tiny_dir / "decoder.fp32.onnx"))
    assert [(i.name, i.shape, i.type) for i in enc.get_inputs()] == [
        ("pixel_values", [1, 3, 1024, 1024], "tensor(float)")
    ]
    assert [(o.name, o.shape) for o in enc.get_outputs()] == [("image_embeddings", [1, 32, 64, 64])]
    ins = {i.name: i.shape for i in dec.get_inputs()}
    assert ins["image_embeddings"] == [1, 32, 64, 64] and len(ins) == 2
    assert isinstance(ins["boxes"][0], str) and ins["boxes"][1] == 4  # N is dynamic
    outs = {o.name: o.shape for o in dec.get_outputs()}
    assert outs["low_res_logits"][1:] == [1, 256, 256] and outs["iou_scores"][1:] == [1]
    for n in (1, 5, 17):  # any N runs
        logits, iou = dec.run(
            None,
            {
                "image_embeddings": np.zeros((1, 32, 64, 64), np.float32),
                "boxes": np.tile(np.float32([[10, 10, 500, 600]]), (n, 1)),
            },
        )
        assert logits.shape == (n, 1, 256, 256) and iou.shape == (n, 1)

    for role in ("encoder", "decoder"):
        model = onnx.load(str(tiny_dir / f"{role}.fp32.onnx"))
        props = {p.key[len(METADATA_PREFIX) :]: p.value for p in model.metadata_props}
        assert props["role"] == role and props["precision"] == "fp32" and props["opset"] == "18"
        assert json.loads(props["model"]) == m["model"]
        assert json.loads(props["preprocessing"]) == m["preprocessing"]
        assert json.loads(props["parity"]) and "RANDOM" in props["warning"]
        assert all(v.doc_string for v in list(model.graph.input) + list(model.graph.output))
    dec_props = {p.key: p.value for p in onnx.load(str(tiny_dir / "decoder.fp32.onnx")).metadata_props}
    assert dec_props[METADATA_PREFIX + "encoder_sha256"] == m["graphs"]["encoder"]["fp32"]["sha256"]
    # the dense positional embedding is a constant, not an input
    assert "image_positional_embeddings" not in ins


def test_local_checkpoint_keeps_its_processor_config(custom_dir, hf_dir):
    m = manifest_of(custom_dir)
    assert m["model"]["kind"] == "hf_dir" and m["model"]["random_weights"] is False and "warning" not in m
    assert m["model"]["source"] == str(hf_dir.resolve())
    p = m["preprocessing"]
    assert p["interpolation"] == "bicubic" and p["image_mean"] == [0.5, 0.4, 0.3] and p["image_std"] == [0.25, 0.2, 0.3]
    assert m["source_processor_config"]["resample"] == 3


def test_random_weights_are_fixed():
    a, b = random_source("tiny"), random_source("tiny")
    assert a.info["checksum"] == b.info["checksum"]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_parity_gate_raises_with_numbers(tiny_dir):
    source = random_source("tiny")
    with torch.no_grad():  # the reference model no longer matches the exported graphs
        source.model.mask_decoder.iou_prediction_head.proj_out.bias += 0.5
    with pytest.raises(
        ParityError, match=r"decoder output 'iou_scores'.*max abs diff 0\.5.* > tolerance 0\.00\d+"
    ) as err:
        check_parity(
            source.reference,
            str(tiny_dir / "encoder.fp32.onnx"),
            str(tiny_dir / "decoder.fp32.onnx"),
            manifest_of(tiny_dir)["preprocessing"],
        )
    assert err.value.max_abs_diff == pytest.approx(0.5, abs=1e-4) and 1e-4 <= err.value.tolerance <= 1e-3
    with pytest.raises(ParityError, match="shape"):
        compare("decoder", "x", "case", np.zeros((2, 3)), np.zeros((3, 2)), 1e-3)
    with pytest.raises(ParityError, match="nan"):
        compare("decoder", "x", "case", np.zeros(3), np.array([0, np.nan, 0]), 1e-3)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import medsam_rt_export.pipeline as pipeline

    def failing_parity(*args, **kwargs):
        raise ParityError("decoder", "low_res_logits", "injected", 1.0, 1e-3)

    monkeypatch.setattr(pipeline, "check_parity", failing_parity)
    with pytest.raises(ParityError):
        export_model(tmp_path / "out", random_weights=True, arch="tiny")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_existing_output_needs_force(tiny_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty; pass --force"):
        export_model(out, random_weights=True, arch="tiny")
    assert (out / "old.txt").read_text() == "keep me"
    export_model(out, random_weights=True, arch="tiny", force=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out.stat().st_mode & 0o777) != 0o700  # not left private by mkdtemp


def test_bad_sources(tmp_path, hf_dir):
    with pytest.raises(ExportError, match="Hugging Face hub.*Offline options: --model DIR"):
        hf_source("flaviagiammarino/medsam-vit-base")
    with pytest.raises(ExportError, match="no such directory"):
        hf_source(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="is a file"):
        hf_source(str(tmp_path / "weights.bin"))
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="has neither preprocessor_config.json nor processor_config.json"):
        hf_source(str(broken))
    (broken / "processor_config.json").write_text(json.dumps({"processor_class": "SamProcessor"}))
    with pytest.raises(ExportError, match="holds no image processor config"):
        hf_source(str(broken))
    (broken / "processor_config.json").unlink()
    shutil.copy(hf_dir / "preprocessor_config.json", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ExportError, match="cannot load SamModel from"):
        hf_source(str(broken))
    # a config that does not fit the weights: transformers would silently re-initialise them
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["mask_decoder_config"]["iou_head_hidden_dim"] = 48
    shutil.copy(hf_dir / "model.safetensors", weights)
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="does not match its SamModel config: .*mismatched keys .*iou_prediction"):
        hf_source(str(broken))
    # weights with a tensor missing: transformers would silently initialise it at random
    from safetensors.torch import load_file, save_file

    shutil.copy(hf_dir / "config.json", broken)
    state = load_file(hf_dir / "model.safetensors")
    del state["mask_decoder.iou_token.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="does not match its SamModel config: 1 missing keys .*iou_token"):
        hf_source(str(broken))
    with pytest.raises(ExportError, match="--opset 9"):
        export_model(tmp_path / "o", random_weights=True, arch="tiny", opset=9)
    with pytest.raises(ExportError, match="unknown --arch"):
        random_source("vit-huge")


def test_checkpoint_saved_with_samprocessor_exports(tmp_path, tiny_source, hf_dir):
    """``SamProcessor.save_pretrained`` (transformers 5: ``processor_config.json``, the image processor nested
    under ``"image_processor"``; transformers 4: ``preprocessor_config.json``) gives a directory that exports with
    the same preprocessing as the processor's own config."""
    from conftest import CUSTOM_PROCESSOR, seed_processor

    d = tmp_path / "saved"
    tiny_source.model.save_pretrained(d)
    seed_processor(**CUSTOM_PROCESSOR).save_pretrained(d)
    written = {p.name for p in d.iterdir()} & {"preprocessor_config.json", "processor_config.json"}
    assert written  # whichever layout the installed transformers writes
    source = hf_source(str(d))
    assert source.preprocessing == hf_source(str(hf_dir)).preprocessing  # hf_dir: preprocessor_config.json
    assert source.preprocessing["interpolation"] == "bicubic" and source.preprocessing["image_mean"] == [0.5, 0.4, 0.3]
    out = export_model(tmp_path / "m", model=str(d), precisions="fp32")
    assert manifest_of(out)["preprocessing"] == source.preprocessing

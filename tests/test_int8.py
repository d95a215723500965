"""int8 that holds on every CPU: exact integer products, the load-time check, and export that degrades.

The CPUs this project runs on differ (AVX2-only, AVX-512, VNNI, ARM). What is tested here and how:
- the int8 graphs' integer products equal a numpy integer reference on inputs that saturate a u8·s8 16-bit
  pair-wise accumulation, on this CPU and, where ``qemu-x86_64`` is installed, on an emulated Haswell (AVX2, no
  AVX-512, no VNNI: the kernels that saturate), which is shown to saturate the old scheme's probe;
- a damaged int8 graph (valid ONNX, wrong scales) is refused by the load-time check, and ``precision="auto"``
  falls back to fp32 with one warning;
- a variant that fails its gate is left out of a default export instead of killing it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import manifest_of
from onnx import TensorProto, helper, numpy_helper

from medsam_rt import MedSAM, PrecisionCheckError
from medsam_rt.core import checks as checks_mod
from medsam_rt.core.cpu import cpu_class, cpu_info, int8_probe, probe_model_bytes
from medsam_rt.core.records import read_records
from medsam_rt.core.util import sha256_file

EXACT_S8 = [255 * 127 * 256, -255 * 128 * 256]
SATURATED_S8 = [128 * 32767, -128 * 32768]
QEMU = shutil.which("qemu-x86_64")


# -- the probe ---------------------------------------------------------------------------------------------------


def test_probe_graph_is_the_documented_two_node_graph():
    model = onnx.load_from_string(probe_model_bytes())
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMulInteger", "MatMulInteger"]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert weights["b_s8"].dtype == np.int8 and weights["b_s8"].shape == (256, 2)
    assert (weights["b_s8"][:, 0] == 127).all() and (weights["b_s8"][:, 1] == -128).all()
    assert weights["b_u8"].dtype == np.uint8 and (weights["b_u8"] == 255).all()


def test_probe_reports_this_cpus_kernels():
    probe = int8_probe()
    assert probe["u8s8"] in (EXACT_S8, SATURATED_S8)  # exact, or the 16-bit pair-wise saturation and nothing else
    assert probe["u8s8_exact"] == (probe["u8s8"] == EXACT_S8)
    assert probe["u8u8"] == 255 * 255 * 256 and probe["u8u8_exact"]  # u8·u8 is exact on every kernel
    info = cpu_info()
    assert info["cpu"] and info["machine"] and info["onnxruntime"]
    assert cpu_class().endswith(f"ort{info['onnxruntime']}") and ("u8s8-exact" in cpu_class()) == probe["u8s8_exact"]


# -- exact integer products ----------------------------------------------------------------------------------------


def _integer_nodes(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, weight, weight zero point) of every MatMulInteger with constant weights."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            out.append((node.name, inits[node.input[1]], inits[node.input[3]]))
    return out


def _single_node_graph(weight: np.ndarray, zero_point: np.ndarray, rows: int) -> bytes:
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [rows, weight.shape[1]])
    inits = [
        numpy_helper.from_array(weight, "b"),
        numpy_helper.from_array(np.array(0, np.uint8), "a_zp"),
        numpy_helper.from_array(zero_point, "b_zp"),
    ]
    node = helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["y"])
    graph = helper.make_graph([node], "one", [a], [y], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def _adversarial_rows(weight: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """uint8 activations that maximise every column's pair sums: 255 where the centred weight is positive (row 0)
    or negative (row 1), 0 elsewhere; row 2 all 255."""
    centred = weight.astype(np.int64) - zero_point.astype(np.int64).reshape(1, -1)
    col = int(np.argmax(np.abs(centred).sum(axis=0)))
    return np.stack([(centred[:, col] > 0) * 255, (centred[:, col] < 0) * 255, np.full(len(centred), 255)]).astype(
        np.uint8
    )


def _run_nodes(nodes) -> list[bool]:
    import onnxruntime as ort

    results = []
    for _, weight, zp in nodes:
        a = _adversarial_rows(weight, zp)
        session = ort.InferenceSession(_single_node_graph(weight, zp, len(a)), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"a": a})
        ref = a.astype(np.int64) @ (weight.astype(np.int64) - zp.astype(np.int64).reshape(1, -1))
        results.append(bool(np.array_equal(got.astype(np.int64), ref)))
    return results


@pytest.fixture(scope="module")
def int8_nodes(lite_dir):
    nodes = _integer_nodes(lite_dir / "encoder.int8.onnx")
    assert len(nodes) == manifest_of(lite_dir)["graphs"]["encoder"]["int8"]["conversion"]["quantized_nodes"] > 20
    return nodes


def test_int8_weights_are_saturation_free(lite_dir, int8_nodes):
    from medsam_rt_export.optimize import integer_weight_ranges, saturation_free

    conv = manifest_of(lite_dir)["graphs"]["encoder"]["int8"]["conversion"]
    assert conv["weight_type"] == "QUInt8" and conv["saturation_free"] and conv["kept_fp32"]["nodes"] == 10
    assert all(w.dtype == np.uint8 for _, w, _ in int8_nodes)
    assert saturation_free(integer_weight_ranges(onnx.load(str(lite_dir / "encoder.int8.onnx"))))


def test_old_signed_scheme_is_recognised_as_saturating(lite_dir, tmp_path):
    """The checker is not vacuous: the previous scheme (int8 weights, full range) fails it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from medsam_rt_export.optimize import integer_weight_ranges, saturation_free

    dst = tmp_path / "old.onnx"
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(lite_dir / "encoder.fp32.onnx"), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    rows = integer_weight_ranges(onnx.load(str(dst)))
    assert rows and not saturation_free(rows) and min(r["min"] for r in rows) < -64


def test_integer_products_equal_numpy_on_saturating_inputs(int8_nodes):
    assert all(_run_nodes(int8_nodes))


_QEMU_SCRIPT = """
import sys, pickle
sys.path.insert(0, {tests!r})
from test_int8 import _run_nodes
from medsam_rt.core.cpu import int8_probe
nodes = pickle.load(open({nodes!r}, "rb"))
print(pickle.dumps((int8_probe(), _run_nodes(nodes))).hex())
"""


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian qemu-user) is not installed")
def test_integer_products_are_exact_on_an_emulated_avx2_cpu(int8_nodes, tmp_path):
    """Under ``qemu-x86_64 -cpu Haswell`` ONNX Runtime selects its AVX2 kernels (no AVX-512, no VNNI): the old
    scheme's u8·s8 probe saturates there, and the shipped graph's integer products are still exact."""
    import pickle

    picked = [int8_nodes[i] for i in np.linspace(0, len(int8_nodes) - 1, 6).astype(int)]  # emulation is slow
    (tmp_path / "nodes.pkl").write_bytes(pickle.dumps(picked))
    script = _QEMU_SCRIPT.format(tests=str(Path(__file__).parent), nodes=str(tmp_path / "nodes.pkl"))
    out = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe, exact = pickle.loads(bytes.fromhex(out.stdout.strip().splitlines()[-1]))
    assert probe["u8s8"] == SATURATED_S8 and not probe["u8s8_exact"]  # really the saturating kernels
    assert probe["u8u8_exact"] and all(exact), exact


# -- the load-time check ---------------------------------------------------------------------------------------------


@pytest.fixture
def check_records(tmp_path, monkeypatch):
    path = tmp_path / "checks.json"
    monkeypatch.setenv(checks_mod.CHECK_CACHE_ENV, str(path))
    monkeypatch.setattr(checks_mod, "_outcomes", {})
    monkeypatch.setattr(checks_mod, "_warned", set())
    return path


def test_int8_passes_its_check_once_per_cpu_class(lite_dir, check_records):
    first = MedSAM.load(lite_dir, precision="int8")
    report = first.precision_check
    assert report["passed"] and not report["cached"] and report["boxes"] >= 3 and report["gated"]
    assert report["min_dice"] >= 0.95 and report["max_iou_diff"] <= 0.02 and report["cpu_class"] == cpu_class()
    check = manifest_of(lite_dir)["check_sample"]
    assert len(check["samples"]) == 3 and check["precisions"] == ["fp16", "int8"] and check["gated"]
    records = read_records(check_records)
    assert len(records) == 1 and next(iter(records.values()))["passed"]
    checks_mod._outcomes.clear()  # a new process: the record file answers
    again = MedSAM.load(lite_dir, precision="int8")
    assert again.precision_check["cached"] and again.precision_check["min_dice"] == report["min_dice"]
    assert MedSAM.load(lite_dir, precision="fp32").precision_check is None


def _damage_int8(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose int8 encoder has every weight scale tripled: valid ONNX, wrong numbers; the manifest
    updated so that its checksums and sizes vouch for the damaged file (as a copy made elsewhere would)."""
    shutil.copytree(src, dst)
    path = dst / "encoder.int8.onnx"
    model = onnx.load(str(path))
    damaged = 0
    for t in model.graph.initializer:
        if t.name.endswith("_scale") and t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3.0, t.name))
            damaged += 1
    assert damaged > 20
    onnx.save(model, str(path))
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = manifest["graphs"]["encoder"]["int8"]
    entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_damaged_int8_is_refused_and_auto_falls_back_once(lite_dir, tmp_path, check_records, caplog):
    bad = tmp_path / "bad"
    _damage_int8(lite_dir, bad)
    with pytest.raises(PrecisionCheckError, match=r"int8 variant .* failed its check on this CPU .*: (mask Dice|IoU)"):
        MedSAM.load(bad, precision="int8")
    with caplog.at_level(logging.WARNING, logger="medsam_rt"):
        auto = MedSAM.load(bad)  # auto would pick int8 on the CPU
        again = MedSAM.load(bad)
    assert auto.precision == "fp32" and again.precision == "fp32"
    warnings = [r for r in caplog.records if "failed its check" in r.getMessage()]
    assert len(warnings) == 1 and "using fp32" in warnings[0].getMessage()
    with pytest.raises(PrecisionCheckError) as info:  # remembered: refused again without running the check
        MedSAM.load(bad, precision="int8")
    assert info.value.precision == "int8" and info.value.metric in ("mask Dice vs fp32", "IoU-score diff vs fp32")


def test_records_survive_concurrent_writers(tmp_path):
    """Four writer processes, 50 keys each, interleaved: every key lands. Fresh interpreters, not ``fork``: a
    forked copy of this multi-threaded test process can inherit a lock another thread held and hang."""
    path = tmp_path / "records.json"
    code = (
        "import sys; from pathlib import Path; from medsam_rt.core.records import put_record\n"
        "for i in range(int(sys.argv[2]), 200, 4): put_record(Path(sys.argv[1]), f'key{i}', {'i': i})"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), str(k)]) for k in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    records = read_records(path)
    assert sorted(records) == sorted(f"key{i}" for i in range(200))
    assert all(records[f"key{i}"] == {"i": i} for i in range(200))


# -- degrade, don't die ------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_int8(monkeypatch):
    """int8 conversion that writes a graph with infinite scales: its (real) gate fails on non-finite outputs."""
    from medsam_rt_export import pipeline

    real = pipeline.quantize_int8

    def quantize(src, dst):
        report = real(src, dst)
        model = onnx.load(str(dst))
        for t in model.graph.initializer:
            if t.name.endswith("_scale") and t.data_type == TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(np.inf), t.name))
        onnx.save(model, str(dst))
        return report

    monkeypatch.setattr(pipeline, "quantize_int8", quantize)


def test_default_export_leaves_a_failing_variant_out(tmp_path, broken_int8):
    from medsam_rt_export import export_model

    out = export_model(tmp_path / "m", random_weights=True, arch="tiny", precisions="fp32,int8", strict=False)
    m = manifest_of(out)
    assert m["precisions"] == ["fp32"] and not (out / "encoder.int8.onnx").exists()
    failed = m["failed_precisions"]["int8"]
    assert failed["metric"].startswith("non-finite") and "int8 gate failed" in failed["message"]
    assert failed["ran_on"]["cpu"] and m["exported_on"]["isa"] == cpu_info()["isa"]
    steps = [s["step"] for s in m["export_steps"]]
    assert steps[:3] == ["load", "export encoder", "export decoder"] and "gate int8" in steps
    assert all(s["seconds"] >= 0 and s["peak_rss_mib"] > 0 for s in m["export_steps"])
    model = MedSAM.load(out)  # auto: the variant that is there
    assert model.precision == "fp32"
    from medsam_rt.core.manifest import load_manifest
    from medsam_rt.tools.info import describe

    assert "int8  LEFT OUT: int8 gate failed" in describe(load_manifest(out))


def test_explicit_precision_must_pass(tmp_path, broken_int8):
    from medsam_rt.errors import GateError
    from medsam_rt_export import export_model

    with pytest.raises(GateError, match="int8 gate failed: non-finite"):
        export_model(tmp_path / "m", random_weights=True, arch="tiny", precisions="fp32,int8")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))


def test_cli_default_export_warns_in_one_line(tmp_path, broken_int8, monkeypatch, capsys):
    from medsam_rt.tools import cli
    from medsam_rt_export import pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_PRECISIONS", ("fp32", "int8"))
    rc = cli.main(["export", "--random-weights", "--arch", "tiny", "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and manifest_of(tmp_path / "m")["precisions"] == ["fp32"]
    assert err == [next(line for line in err if line.startswith("medsam-rt: warning: int8 left out: int8 gate failed"))]

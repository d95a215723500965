"""`medsam-rt bench`: real measurements of every backend in subprocesses, JSON lines + markdown written."""

from __future__ import annotations

import json

import numpy as np

from medsam_rt.tools.bench import DRAG_BOXES, DRAG_SIZES, IMAGE_SIZES, drag_boxes, format_table, run_bench


def test_bench_quick_measures_every_backend(tiny_dir, tmp_path):
    lines: list[str] = []
    # one drag size: the tiny model's random-weight masks are all boundary (dense cost) at 4096²
    rows = run_bench(tiny_dir, tmp_path, quick=True, print_fn=lines.append, drag_sizes=(512,))
    assert [r["backend"] for r in rows] == ["pytorch-fp32", "ort-fp32", "ort-fp16"]
    for r in rows:
        assert r["encoder_ms"] > 0 and r["cold_start_s"] > 0 and r["peak_rss_mib"] > 50
        assert set(r["decoder_per_box_ms"]) == {1, 4, 16} and all(v > 0 for v in r["decoder_per_box_ms"].values())
        assert set(r["interactive_ms"]) == set(IMAGE_SIZES)
        assert r["hardware"]["cores"] >= 1 and "onnxruntime" in r["hardware"]["versions"]
        assert r["random_weights"] is True and r["quick"] is True
        assert set(r["drag"]) == {512}
        assert all(0 < d["p50_ms"] <= d["p95_ms"] and d["boxes"] == DRAG_BOXES for d in r["drag"].values())
    assert rows[0]["graph_mib"] is None and rows[1]["graph_mib"] > rows[2]["graph_mib"]  # fp16 graphs are smaller
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".jsonl", ".md", ".png"]
    from PIL import Image

    plot = Image.open(next(tmp_path.glob("*.png")))
    assert plot.format == "PNG" and plot.size[0] > 600
    jsonl = next(tmp_path.glob("*.jsonl")).read_text().splitlines()
    assert [json.loads(line)["backend"] for line in jsonl] == ["pytorch-fp32", "ort-fp32", "ort-fp16"]
    table = "\n".join(lines)
    assert "| ort-fp32 |" in table and "skipped: CUDA rows" in table and "vs PyTorch" in table
    header, sep = table.splitlines()[2:4]
    assert header.count("|") == sep.count("|")
    assert "drag: 30 successive boxes" in table and "| ort-fp32 | cpu | " in table.split("drag:")[1]


def test_drag_boxes_are_one_deterministic_drag():
    for size in DRAG_SIZES:
        boxes = drag_boxes(size)
        assert boxes.shape == (DRAG_BOXES, 4)
        np.testing.assert_array_equal(boxes, drag_boxes(size))  # every backend gets the same sequence
        assert (boxes >= 0).all() and (boxes <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        step = np.abs(np.diff(boxes, axis=0)).max()
        assert 0 < step <= 3 * max(1, size // 512)  # a few pixels off the last


def test_table_without_torch_row():
    row = {
        "backend": "ort-fp32",
        "model": "m",
        "random_weights": False,
        "rounds": 1,
        "repeats": 3,
        "encoder_ms": 10.0,
        "decoder_per_box_ms": {1: 2.0},
        "decoder_ms": {1: 2.0},
        "interactive_ms": {s: 3.0 for s in IMAGE_SIZES},
        "cold_start_s": 0.5,
        "peak_rss_mib": 100.0,
        "graph_mib": 1.0,
    }
    table = format_table([row], ["pytorch-fp32: No module named 'torch'"], {"cpu": "x", "cores": 2, "gpu": None})
    assert "| ort-fp32 | cpu | 10 | – |" in table and "skipped: pytorch-fp32" in table
    gpu_rows = [
        {**row, "backend": "pytorch-cuda-fp32", "device": "cuda", "encoder_ms": 40.0, "peak_gpu_mib": 900.0},
        {**row, "device": "cuda", "encoder_ms": 10.0, "peak_gpu_mib": 500.0},
    ]
    table = format_table(gpu_rows, [], {"cpu": "x", "cores": 16, "gpu": "NVIDIA H100, 580.1"})
    assert "| ort-fp32 | cuda | 10 | 0.25× |" in table and "peak GPU MiB" in table and "| 500 |" in table
    header, sep = table.splitlines()[2:4]
    assert header.count("|") == sep.count("|")


def test_optimum_row_is_skipped_with_its_reason(tiny_dir, tmp_path, monkeypatch):
    import sys

    from medsam_rt.tools.bench import _prepare_optimum

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached
    assert "LiteMedSAM (TinyViT) is not one" in _prepare_optimum(tiny_dir, sys.executable, "litemedsam")
    assert "no --optimum-python given" in _prepare_optimum(tiny_dir, None, "random")
    try:
        import optimum.exporters.onnx  # noqa: F401

        has_optimum = True
    except ImportError:
        has_optimum = False
    if not has_optimum:  # this env's Python cannot export it: the reason names the failure
        reason = _prepare_optimum(tiny_dir, sys.executable, "random")
        assert "export failed" in reason and "optimum-onnx is not installed" in reason

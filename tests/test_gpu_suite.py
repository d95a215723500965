"""benchmarks/gpu_suite.sh, the one-command GPU check, run end to end on the CPU (tiny model) so that the
script a GPU host will run is known to work here; on a GPU host it runs with SUITE_DEVICE=cuda (the default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.full
def test_gpu_suite_plumbing_on_cpu(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    env = {**os.environ, "SUITE_DEVICE": "cpu", "SUITE_ARCH": "tiny", "SUITE_LITE": "0", "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(wheels), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    parity = json.loads((out / "parity.json").read_text())
    (entry,) = parity.values()
    assert entry["cuda_fp32_vs_cpu_fp32"]["passed"] and entry["cuda_fp16_vs_cuda_fp32"]["passed"]
    assert entry["cuda_fp32_vs_cpu_fp32"]["boxes"] >= 10
    names = sorted(p.suffix for p in out.iterdir())
    assert names.count(".jsonl") == 1 and names.count(".png") == 1 and names.count(".md") == 1
    rows = [json.loads(line) for line in next(out.glob("*.jsonl")).read_text().splitlines()]
    assert {r["backend"] for r in rows} >= {"pytorch-fp32", "ort-fp32", "ort-fp16"}

"""CUDA-vs-CPU parity of exported model directories (run by gpu_suite.sh on a GPU host).

For every validation sample and box: the mask of medsam-rt fp32 on CUDA against fp32 on the CPU (Dice >= 0.99)
and fp16 on CUDA against fp32 on CUDA (the export gate's bound for fp16, Dice >= 0.98, IoU-score diff <= 0.02).
The CUDA models run the default option set (IO binding, masks made by the postprocessing graph on the GPU); the
"cuda-graph" set (bucketed decoders, static buffers, CUDA graphs) is checked against it at the default precision
(Dice >= 0.99). Each entry records what ran (``MedSAM.execution_report()``).
Prints one JSON object; exits 1 if a check fails.

usage: python benchmarks/gpu_parity.py [--device cuda|cpu] MODEL_DIR [MODEL_DIR ...]
(--device cpu compares the CPU with itself: the plumbing check of the full test tier on a host without a GPU)
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from medsam_rt import MedSAM
from medsam_rt.tools.samples import dice, validation_set

CUDA_VS_CPU_MIN_DICE = 0.99
FP16_MIN_DICE = 0.98
FP16_MAX_IOU_DIFF = 0.02


def compare(a: MedSAM, b: MedSAM) -> dict:
    dices, iou_diffs, worst = [], [], None
    for sample in validation_set():
        ra, rb = a.predict(sample.image, sample.boxes), b.predict(sample.image, sample.boxes)
        for k in range(len(sample.boxes)):
            d = dice(ra.masks[k], rb.masks[k])
            if not dices or d < min(dices):
                worst = f"{sample.name}, box {k}"
            dices.append(d)
            iou_diffs.append(float(abs(ra.scores[k] - rb.scores[k])))
    return {
        "boxes": len(dices),
        "min_dice": min(dices),
        "mean_dice": float(np.mean(dices)),
        "max_iou_diff": max(iou_diffs),
        "worst": worst,
    }


def main(args: list[str]) -> int:
    device = "cuda"
    if args[:1] == ["--device"]:
        device, args = args[1], args[2:]
    report, ok = {}, True
    for d in args:
        t0 = time.perf_counter()
        cpu = MedSAM.load(d, device="cpu", precision="fp32")
        cuda32 = MedSAM.load(d, device=device, precision="fp32")
        entry = {"device": device, "cuda_fp32_vs_cpu_fp32": compare(cuda32, cpu)}
        entry["cuda_fp32_vs_cpu_fp32"]["passed"] = entry["cuda_fp32_vs_cpu_fp32"]["min_dice"] >= CUDA_VS_CPU_MIN_DICE
        if "fp16" in cpu.manifest.precisions:
            f16 = compare(MedSAM.load(d, device=device, precision="fp16"), cuda32)
            f16["passed"] = f16["min_dice"] >= FP16_MIN_DICE and f16["max_iou_diff"] <= FP16_MAX_IOU_DIFF
            entry["cuda_fp16_vs_cuda_fp32"] = f16
        default = MedSAM.load(d, device=device)  # precision auto: fp16 on CUDA when exported
        entry["execution"] = {"fp32": cuda32.execution_report(), "default": default.execution_report()}
        try:  # never run on a GPU before: a capture ONNX Runtime refuses is reported, not fatal to the report
            graphs = MedSAM.load(d, device=device, cuda_options="cuda-graph")
            entry["cuda_graph_vs_default"] = compare(graphs, default)
            entry["cuda_graph_vs_default"]["passed"] = (
                entry["cuda_graph_vs_default"]["min_dice"] >= CUDA_VS_CPU_MIN_DICE
            )
            entry["execution"]["cuda-graph"] = graphs.execution_report()
        except Exception as exc:
            entry["cuda_graph_vs_default"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        entry["random_weights"] = cpu.manifest.random_weights
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        ok &= all(v["passed"] for v in entry.values() if isinstance(v, dict) and "passed" in v)
        report[d] = entry
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

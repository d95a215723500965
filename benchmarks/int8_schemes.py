"""Which int8 scheme: accuracy against fp32 and latency of each candidate quantisation of one encoder, same run.

    python benchmarks/int8_schemes.py MODEL_DIR [--rounds 3] [--repeats 5] [--out benchmarks/results]

MODEL_DIR holds ``encoder.fp32.onnx`` (any export). Candidates, all dynamic per-channel MatMul/Gemm unless said:
``s8`` (int8 weights: the previous scheme; saturates u8·s8 pair sums on CPUs without VNNI), ``s8-7bit``
(int8 weights in [-64, 63]: ``reduce_range``), ``u8`` (uint8 weights: u8·u8 kernels, exact everywhere), the
``-gelu-fp32`` variants (the MatMuls fed by a GELU kept fp32: what ``medsam-rt export`` ships as ``u8-gelu-fp32``),
and ``static-conv+u8-gelu-fp32`` (calibrated QDQ uint8 convolutions on the validation images, then the shipped
dynamic scheme). For each: whether its integer weights are saturation-free, the relative L2 error of the
embedding vs fp32 on the validation images, and the export gate's metrics (per-box mask Dice and IoU-score
difference vs the fp32 graphs, fp32 decoder), then latency (median of ``--repeats``, CPU time too) with every
candidate in its own process, rounds alternating. One JSON line per candidate + a markdown table; the CPU and
its flags are in every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CANDIDATES = ("s8", "s8-7bit", "u8", "s8-7bit-gelu-fp32", "u8-gelu-fp32", "static-conv+u8-gelu-fp32")


def quantise(name: str, src: Path, dst: Path, preprocessing: dict) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from medsam_rt.core.preprocess import Preprocessing, preprocess_image, to_rgb_uint8
    from medsam_rt.tools.samples import validation_set
    from medsam_rt_export.optimize import gelu_fed_matmuls, quantize_int8

    logging.getLogger().setLevel(logging.ERROR)
    if name == "u8-gelu-fp32":
        quantize_int8(src, dst)
        return
    if name.startswith("static-conv"):
        p = Preprocessing.from_dict(preprocessing)
        feeds = iter([{"pixel_values": preprocess_image(to_rgb_uint8(s.image), p)[0]} for s in validation_set()])

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(feeds, None)

        conv = dst.with_name(dst.stem + ".conv.onnx")
        quantize_static(
            str(src), str(conv), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["Conv"],
        )  # fmt: skip
        quantize_int8(conv, dst)
        return
    exclude = gelu_fed_matmuls(onnx.load(str(src))) if name.endswith("gelu-fp32") else []
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QUInt8 if name.startswith("u8") else QuantType.QInt8,
        reduce_range=name.startswith("s8-7bit"),
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude + [f"{n}_MatMul" for n in exclude],
    )


def accuracy(model_dir: Path, encoder: Path, fp32_results: dict) -> dict:
    """Embedding error and the gate's mask metrics of ``encoder`` (with the fp32 decoder) vs the fp32 graphs."""
    from medsam_rt.core.model import MedSAM
    from medsam_rt.tools.samples import dice, validation_set

    manifest = json.loads((model_dir / "manifest.json").read_text())
    from medsam_rt.core.preprocess import Preprocessing

    p = Preprocessing.from_dict(manifest["preprocessing"])
    model = MedSAM(p, encoder, model_dir / "decoder.fp32.onnx", model_id="candidate")
    rel, dices, ious, worst = [], [], [], ("", 1.0)
    for s in validation_set():
        ref_emb, ref = fp32_results[s.name]
        emb = model.embed(s.image)
        res = model.segment(emb, s.boxes)
        rel.append(float(np.linalg.norm(emb.embeddings - ref_emb) / np.linalg.norm(ref_emb)))
        for k in range(len(s.boxes)):
            d = dice(res.masks[k], ref.masks[k])
            dices.append(d)
            worst = min(worst, (s.name, d), key=lambda t: t[1])
        ious.append(float(np.abs(res.scores - ref.scores).max()))
    return {
        "embedding_rel_l2_mean": float(np.mean(rel)),
        "min_dice": min(dices),
        "mean_dice": float(np.mean(dices)),
        "max_iou_diff": max(ious),
        "worst": worst[0],
    }


def time_worker(path: str, repeats: int) -> None:
    """In a fresh process: median wall and CPU time of the encoder on a random input (2 threads, no spinning)."""
    import onnxruntime as ort

    from medsam_rt.core.providers import physical_cores

    o = ort.SessionOptions()
    o.intra_op_num_threads = physical_cores()
    o.enable_mem_pattern = False
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random([1, 3, *s.get_inputs()[0].shape[2:]], dtype=np.float32)
    s.run(None, {"pixel_values": x})
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        s.run(None, {"pixel_values": x})
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(json.dumps({"wall_ms": 1000 * float(np.median(wall)), "cpu_ms": 1000 * float(np.median(cpu))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--time-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_worker:
        time_worker(args.time_worker[0], int(args.time_worker[1]))
        return
    import onnx

    from medsam_rt.core.cpu import cpu_info
    from medsam_rt.core.model import MedSAM
    from medsam_rt.core.preprocess import Preprocessing
    from medsam_rt.tools.samples import validation_set
    from medsam_rt_export.optimize import integer_weight_ranges, saturation_free

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    src = args.model_dir / "encoder.fp32.onnx"
    p = Preprocessing.from_dict(manifest["preprocessing"])
    ref = MedSAM(p, src, args.model_dir / "decoder.fp32.onnx", model_id="fp32")
    fp32_results = {}
    for s in validation_set():
        emb = ref.embed(s.image)
        fp32_results[s.name] = (np.array(emb.embeddings), ref.segment(emb, s.boxes))
    hw = cpu_info()
    tmp = Path(tempfile.mkdtemp(prefix="int8-schemes-"))
    rows = {}
    names = args.candidates.split(",")
    for name in names:
        dst = tmp / f"{name}.onnx"
        quantise(name, src, dst, manifest["preprocessing"])
        ranges = integer_weight_ranges(onnx.load(str(dst)))
        rows[name] = {"candidate": name, "saturation_free": saturation_free(ranges), "integer_ops": len(ranges)}
        rows[name].update(accuracy(args.model_dir, dst, fp32_results))
        print(f"{name}: {rows[name]}", file=sys.stderr)
    paths = {"fp32": src, **{n: tmp / f"{n}.onnx" for n in names}}
    times = {n: [] for n in paths}
    for r in range(args.rounds):
        for n in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            cmd = [sys.executable, __file__, str(args.model_dir), "--time-worker", str(paths[n]), str(args.repeats)]
            times[n].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    rows["fp32"] = {"candidate": "fp32"}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = manifest["model"]["source"]
    lines = [
        f"int8 candidates for {model} on {hw['cpu']} ({' '.join(hw['isa'])}; u8s8 "
        f"{'exact' if hw['int8_probe']['u8s8_exact'] else 'saturates'}), {args.rounds} rounds x {args.repeats}",
        "",
        "| candidate | saturation-free | embedding rel. L2 | min Dice | mean Dice | max IoU diff | wall ms | CPU ms "
        "| vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = float(np.median([t["wall_ms"] for t in times["fp32"]]))
    with open(args.out / f"int8-schemes-{stamp}.jsonl", "w") as fh:
        for n in paths:
            row = rows[n]
            row["wall_ms"] = float(np.median([t["wall_ms"] for t in times[n]]))
            row["cpu_ms"] = float(np.median([t["cpu_ms"] for t in times[n]]))
            row.update({"model": model, "hardware": hw, "rounds": args.rounds, "repeats": args.repeats})
            fh.write(json.dumps(row) + "\n")

            def f(key, fmt, row=row):
                return format(row[key], fmt) if key in row else "–"

            lines.append(
                f"| {n} | {row.get('saturation_free', '–')} | {f('embedding_rel_l2_mean', '.3f')} "
                f"| {f('min_dice', '.4f')} | {f('mean_dice', '.4f')} | {f('max_iou_diff', '.4f')} "
                f"| {row['wall_ms']:.0f} | {row['cpu_ms']:.0f} | {row['wall_ms'] / base:.2f}x |"
            )
    text = "\n".join(lines) + "\n"
    (args.out / f"int8-schemes-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

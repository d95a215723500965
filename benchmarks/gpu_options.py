"""What does each CUDA option set do? (run by gpu_suite.sh on a GPU host; nothing here has run on a GPU yet)

Every named set of ``medsam_rt.core.cuda.OPTION_SETS`` is measured in its own process (its cold start, arena and
captured graphs are its own), the baseline ``no-io-binding`` first: load time, first encode (cuDNN's algorithm
search happens here: compare ``default`` with ``heuristic-conv``), encoder latency, decoder + masks latency at
N = 1, 4, 16, 64 boxes per call on a 512² image, one box → mask on a 2048² image, peak GPU memory, and the
masks of 16 boxes against the baseline's (min Dice; a set whose masks drift is reported as failed: buckets,
static buffers and CUDA graphs must not change results). Sets that fail to start are reported with the error.

Writes one JSON object per set (with the hardware fingerprint, library versions and what actually ran:
``MedSAM.execution_report()``) to ``--out`` (JSON lines) and a markdown table to stdout; exits 1 if a set
failed to run or its masks drifted.

usage: python benchmarks/gpu_options.py [--device cuda|cpu] [--precision auto|fp32|fp16] [--sets a,b,...]
           [--repeats N] [--budget-s S] [--out FILE.jsonl] MODEL_DIR
(--device cpu runs the same sets on the CPU provider: the plumbing check of the full test tier)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "no-io-binding"
#: Measured in this order (the most informative first, in case the time budget runs out).
ORDER = (BASELINE, "default", "cuda-graph", "heuristic-conv", "buckets", "nhwc", "host-postprocess")
BOX_COUNTS = (1, 4, 16, 64)
CHECK_BOXES = 16
MIN_DICE = 0.99  # as gpu_parity.py's CUDA-vs-CPU bound: different kernels may move boundary pixels, no more


def worker(model_dir: str, name: str, device: str, precision: str, repeats: int, reference: Path) -> dict[str, Any]:
    """Measure one option set in this (fresh) process."""
    from medsam_rt import MedSAM
    from medsam_rt.tools.bench import _boxes, _process_gpu_mib, timed
    from medsam_rt.tools.samples import dice, ellipse_phantom

    t0 = time.perf_counter()
    model = MedSAM.load(model_dir, device=device, precision=precision, cuda_options=name)
    load_s = time.perf_counter() - t0
    image, big = ellipse_phantom(512, 512, seed=1).image, ellipse_phantom(2048, 2048, seed=2).image
    t1 = time.perf_counter()
    emb = model.embed(image)
    first_embed_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    model.segment(emb, _boxes(1, 512))
    first_segment_s = time.perf_counter() - t1
    cold_start_s = time.perf_counter() - t0
    encoder, emb = timed(lambda: model.embed(image), repeats)
    decoder = {}
    for n in BOX_COUNTS:
        boxes = _boxes(n, 512)
        stats, _ = timed(lambda boxes=boxes: model.segment(emb, boxes).masks, repeats)
        decoder[str(n)] = {**stats, "per_box_ms": stats["median_ms"] / n}
    big_emb = model.embed(big)
    big_box = _boxes(1, 2048)
    loop_2048, _ = timed(lambda: model.segment(big_emb, big_box).masks, repeats)
    check = model.segment(emb, _boxes(CHECK_BOXES, 512))
    if name == BASELINE:
        np.savez(reference, masks=check.masks, scores=check.scores)
        agreement = None
    else:
        ref = np.load(reference)
        dices = [dice(a, b) for a, b in zip(check.masks, ref["masks"], strict=True)]
        agreement = {
            "min_dice": float(min(dices)),
            "pixels_differing": int((check.masks != ref["masks"]).sum()),
            "max_score_diff": float(np.abs(check.scores - ref["scores"]).max()),
        }
        agreement["passed"] = agreement["min_dice"] >= MIN_DICE
    return {
        "set": name,
        "load_s": load_s,
        "first_embed_s": first_embed_s,
        "first_segment_s": first_segment_s,
        "cold_start_s": cold_start_s,
        "encoder": encoder,
        "decoder": decoder,
        "box_to_mask_2048": loop_2048,
        "peak_gpu_mib": _process_gpu_mib() if device == "cuda" else None,
        "vs_baseline": agreement,
        "execution": model.execution_report(),
    }


def run_sets(args: argparse.Namespace) -> list[dict[str, Any]]:
    from medsam_rt.core.cuda import OPTION_SETS
    from medsam_rt.tools.bench import fingerprint

    names = args.sets.split(",") if args.sets else [*ORDER, *(n for n in OPTION_SETS if n not in ORDER)]
    if BASELINE in names:
        names.remove(BASELINE)
    names.insert(0, BASELINE)  # the others are checked against its masks
    hw = fingerprint()
    rows, deadline = [], time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-options-") as tmp:
        reference = Path(tmp) / "baseline.npz"
        for name in names:
            base = {"benchmark": "gpu_options", "model_dir": args.model_dir, "device": args.device}
            base |= {"precision": args.precision, "repeats": args.repeats, "hardware": hw}
            left = deadline - time.monotonic()
            if left < 10:
                rows.append({**base, "set": name, "skipped": f"the {args.budget_s:.0f} s budget was spent"})
                continue
            cmd = [sys.executable, __file__, "--worker", name, args.model_dir, args.device, args.precision]
            cmd += [str(args.repeats), str(reference)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, left))
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    rows.append({**base, "set": name, "error": f"exit {r.returncode}: {last}"})
                else:
                    rows.append({**base, **json.loads(r.stdout.strip().splitlines()[-1])})
            except subprocess.TimeoutExpired:
                rows.append({**base, "set": name, "error": f"timed out after {left:.0f} s"})
            rows[-1]["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per option set; ratios against the baseline set's medians."""
    base = next((r for r in rows if r["set"] == BASELINE and "encoder" in r), None)
    head = rows[0]["hardware"]
    lines = [
        f"{rows[0]['model_dir']} on {head.get('gpu') or head['cpu']}, device {rows[0]['device']}, "
        f"precision {rows[0]['precision']}, medians of {rows[0]['repeats']} (after one warm-up)",
        "",
        "| set | load s | first encode s | encoder ms | vs baseline | "
        + " | ".join(f"N={n} ms" for n in BOX_COUNTS)
        + " | box→mask 2048² ms | peak GPU MiB | min Dice vs baseline | notes |",
        "|" + "---|" * (9 + len(BOX_COUNTS)),
    ]
    for r in rows:
        if "error" in r or "skipped" in r:
            why = f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['set']} |" + " – |" * (7 + len(BOX_COUNTS)) + f" {why} |")
            continue
        enc = r["encoder"]["median_ms"]
        ratio = f"{enc / base['encoder']['median_ms']:.2f}×" if base else "–"
        vs = r["vs_baseline"]
        io = r["execution"]["io_binding"]
        notes = "numpy feeds" if io is None else f"masks: {io['postprocess']}; copies: {io['device_copy']}"
        if io is not None and io["cuda_graphs"]:
            notes += "; CUDA graphs"
        lines.append(
            f"| {r['set']} | {r['load_s']:.2f} | {r['first_embed_s']:.2f} | {enc:.2f} | {ratio} | "
            + " | ".join(f"{r['decoder'][str(n)]['median_ms']:.2f}" for n in BOX_COUNTS)
            + f" | {r['box_to_mask_2048']['median_ms']:.2f} | "
            + ("–" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}")
            + " | "
            + ("baseline" if vs is None else f"{vs['min_dice']:.4f}" + ("" if vs["passed"] else " FAILED"))
            + f" | {notes} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        name, model_dir, device, precision, repeats, reference = argv[1:7]
        print(json.dumps(worker(model_dir, name, device, precision, int(repeats), Path(reference))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--precision", default="auto", help="auto: fp16 on CUDA when exported (default: %(default)s)")
    ap.add_argument("--sets", default="", help="comma-separated option set names (default: all)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=120.0, help="no new set starts after this (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="JSON lines file")
    args = ap.parse_args(argv)
    rows = run_sets(args)
    print(format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = [r["set"] for r in rows if "error" in r or (r.get("vs_baseline") or {}).get("passed") is False]
    if failed:
        print(f"failed or drifted: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

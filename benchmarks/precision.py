"""Precision variants on this CPU: encoder and decoder latency, file size and peak memory per variant,
next to the fp32 PyTorch model, in the same run.

    python benchmarks/precision.py MODEL_DIR [--repeats 5] [--rounds 2] [--out benchmarks/results]

Each backend runs in its own subprocess (so peak RSS is its own), warm-up first, then ``--repeats`` timed
runs; the backends alternate for ``--rounds`` rounds so that ratios survive a noisy machine. Writes one JSON
line per measurement (config, hardware, versions) and a markdown table. "decoder" is one box to a mask at the
image's resolution, for both medsam-rt (``segment``) and PyTorch (decoder + bilinear + threshold).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medsam_rt.tools.bench import fingerprint, ort_backend, timed

IMAGE_SHAPE = (512, 512)


def _image() -> np.ndarray:
    from medsam_rt.tools.samples import ellipse_phantom

    return ellipse_phantom(*IMAGE_SHAPE, seed=1).image


def worker(model_dir: Path, backend: str, repeats: int) -> dict:
    """Measure one backend in this (fresh) process, with the backends ``medsam-rt bench`` uses."""
    image = _image()
    box = np.array([[150.0, 150, 380, 380]])
    t0 = time.perf_counter()
    if backend == "pytorch-fp32":
        from medsam_rt_export.bench import torch_backend

        embed, segment, extra = torch_backend(model_dir)
    else:
        embed, segment, extra = ort_backend(model_dir, backend.split("-", 1)[1], "cpu")
    emb = embed(image)
    cold = time.perf_counter() - t0
    enc, emb = timed(lambda: embed(image), repeats)
    dec, _ = timed(lambda: segment(emb, box), repeats)
    size = extra["graph_mib"]
    return {
        "backend": backend,
        "encoder": enc,
        "decoder_1box": dec,
        "cold_start_s": cold,
        "graph_mib": size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch row")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model_dir, args.worker, args.repeats)))
        return
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    backends = ([] if args.no_torch else ["pytorch-fp32"]) + [f"ort-{p}" for p in manifest["precisions"]]
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(args.rounds):
        for b in backends:
            r = subprocess.run(
                [sys.executable, __file__, str(args.model_dir), "--worker", b, "--repeats", str(args.repeats)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[b].append(json.loads(r.stdout.strip().splitlines()[-1]))
    hw = fingerprint()
    model = manifest["model"]["source"]
    rows = []
    for b, rs in runs.items():
        row = {
            "benchmark": "precision",
            "model": model,
            "random_weights": manifest["model"]["random_weights"],
            "backend": b,
            "image": list(IMAGE_SHAPE),
            "repeats": args.repeats,
            "rounds": args.rounds,
            "encoder_median_ms": float(np.median([r["encoder"]["median_ms"] for r in rs])),
            "encoder_p95_ms": float(np.max([r["encoder"]["p95_ms"] for r in rs])),
            "decoder_median_ms": float(np.median([r["decoder_1box"]["median_ms"] for r in rs])),
            "cold_start_s": float(np.median([r["cold_start_s"] for r in rs])),
            "graph_mib": rs[0]["graph_mib"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "hardware": hw,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        rows.append(row)
    base = next((r for r in rows if r["backend"] == "ort-fp32"), rows[0])
    torch_row = next((r for r in rows if r["backend"] == "pytorch-fp32"), None)
    lines = [
        f"{model} ({'random weights' if rows[0]['random_weights'] else 'trained'}), {hw['cpu']}, "
        f"{hw['cores']} cores, image {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}, medians of {args.rounds}x{args.repeats}",
        "",
        "| backend | encoder ms | vs ORT fp32 | vs PyTorch | decoder ms (1 box) | cold start s | graphs MiB "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs_torch = f"{r['encoder_median_ms'] / torch_row['encoder_median_ms']:.2f}×" if torch_row else "–"
        graph = "–" if r["graph_mib"] is None else f"{r['graph_mib']:.1f}"
        lines.append(
            f"| {r['backend']} | {r['encoder_median_ms']:.0f} | "
            f"{r['encoder_median_ms'] / base['encoder_median_ms']:.2f}× | {vs_torch} | "
            f"{r['decoder_median_ms']:.1f} | {r['cold_start_s']:.2f} | {graph} | {r['peak_rss_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"precision-{Path(model).name.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

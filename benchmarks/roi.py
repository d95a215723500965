"""Whole-image mode against ``--roi`` (medsam_rt.core.roi) on phantoms with known truth: Dice per object size.

    python benchmarks/roi.py MODEL_DIR [--size 6000] [--small 24] [--large 3] [--out benchmarks/results]

The phantom (benchmarks/phantoms.py): ``--small`` ellipses with semi-axes 8-40 px and ``--large`` with 300-900 px
on a noisy ``--size``-square canvas, one box per ellipse (its bounding box + 4 px). Each mode runs once on the same
loaded model (fp32); Dice of every mask against its ellipse, grouped by the ellipse's longest axis; time per mode
and encoder runs. Writes one JSON line per object and mode (config, hardware, versions) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantoms import crop_dice, make_phantom  # noqa: E402

from medsam_rt import MedSAM  # noqa: E402
from medsam_rt.core.roi import segment_roi  # noqa: E402
from medsam_rt.tools.bench import fingerprint  # noqa: E402

BINS = [(0, 24), (24, 48), (48, 96), (96, 400), (400, 4000)]  # ellipse diameter (longest axis), pixels


def phantom(size: int, small: int, large: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    radii = [(float(a), float(a * rng.uniform(0.6, 1.0))) for a in rng.uniform(300, 900, large)]
    radii += [(float(a), float(a * rng.uniform(0.6, 1.0))) for a in rng.uniform(8, 40, small)]
    return make_phantom(size, radii, seed=seed)


def evaluate(ph, seg) -> list[dict]:
    rows = []
    for k in range(len(ph.boxes)):
        y0, x0, truth = ph.truth(k)
        rows.append(
            {"object": k, "diameter": round(2 * float(max(ph.ellipses[k, 2:])), 1),
             "dice": round(crop_dice(seg.crops[k], y0, x0, truth), 4), "score": round(float(seg.scores[k]), 4)}
        )  # fmt: skip
    return rows


def table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"CPU: {meta['cpu']} ({meta['cores']} cores); {meta['size']}² phantom, {meta['objects']} objects; "
        f"LiteMedSAM fp32",
        "",
        "| object diameter px | objects | Dice whole-image (median, min) | Dice --roi (median, min) |",
        "|---|---|---|---|",
    ]
    for lo, hi in BINS:
        per = {m: [r["dice"] for r in rows if r["mode"] == m and lo <= r["diameter"] < hi] for m in ("whole", "roi")}
        if not per["whole"]:
            continue
        cells = [f"{np.median(v):.3f}, {min(v):.3f}" for v in (per["whole"], per["roi"])]
        lines.append(f"| {lo}-{hi} | {len(per['whole'])} | {cells[0]} | {cells[1]} |")
    lines += ["", "| mode | seconds | encoder runs |", "|---|---|---|"]
    for m in ("whole", "roi"):
        lines.append(f"| {m} | {meta[m + '_s']:.1f} | {meta[m + '_encodes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--small", type=int, default=24)
    ap.add_argument("--large", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    ph = phantom(a.size, a.small, a.large)
    model = MedSAM.load(a.model_dir, precision="fp32")
    meta = {"size": a.size, "objects": len(ph.boxes), **fingerprint()}
    t = time.perf_counter()
    whole = model.segment(model.embed(ph.image), ph.boxes)
    meta["whole_s"], meta["whole_encodes"] = time.perf_counter() - t, 1
    t = time.perf_counter()
    roi = segment_roi(model, ph.image, ph.boxes)
    meta["roi_s"], meta["roi_encodes"] = time.perf_counter() - t, len(roi.upscale.windows)
    rows = [{**r, "mode": "whole"} for r in evaluate(ph, whole)] + [{**r, "mode": "roi"} for r in evaluate(ph, roi)]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"roi-{time.strftime('%Y%m%d-%H%M%S')}"
    path.with_suffix(".jsonl").write_text("".join(json.dumps({**meta, **r}) + "\n" for r in rows))
    path.with_suffix(".md").write_text(table(rows, meta))
    print(table(rows, meta))


if __name__ == "__main__":
    main()

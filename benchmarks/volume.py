"""3-D cases on this CPU: seconds per case of medsam-rt's ``segment_volume`` against the CVPR24 reference loop
(LiteMedSAM in PyTorch, every slice encoded again for every object, as ``MedSAM_infer_npz_3D`` does), in one run,
and peak memory of medsam-rt on a 512x512x300 volume with 5 objects.

    python benchmarks/volume.py MODEL_DIR [--slices 24] [--objects 1,3,5] [--rounds 1] [--rss-slices 300]
        [--quick] [--out benchmarks/results]

Cases: ellipsoid phantoms of 512x512 x ``--slices`` uint8 slices with N objects whose 3-D boxes span the same
slices (the issue's target: at most 1/N of the reference's time plus the decoder's). Each case runs in a fresh
subprocess per backend, the backends alternating; a case's time is the call (embedding, decoding, labels), not
process start or model load (reported apart). The memory case runs medsam-rt alone in its own process
(``ru_maxrss``). Writes one JSON line per measurement (config, hardware, versions) and a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medsam_rt.tools.bench import fingerprint


def phantom(slices: int, objects: int, size: int = 512, seed: int = 0):
    """N ellipsoids over the same slices (centred on the middle one), spread over the slice plane."""
    from medsam_rt.core.volume import ellipsoid_phantom

    rng = np.random.default_rng(seed)
    z = (slices - 1) / 2
    specs = []
    for k in range(objects):
        angle = 2 * np.pi * k / max(objects, 1)
        yc, xc = size / 2 + size * 0.28 * np.sin(angle), size / 2 + size * 0.28 * np.cos(angle)
        specs.append(((z, yc, xc), (slices / 2 + 0.4, float(rng.uniform(25, 45)), float(rng.uniform(25, 45)))))
    ph = ellipsoid_phantom((slices, size, size), specs, seed=seed)
    boxes = ph.boxes3d.copy()
    boxes[:, 2], boxes[:, 5] = 0, slices - 1  # every box over every slice
    return ph, boxes


def worker(model_dir: Path, backend: str, slices: int, objects: int) -> dict:
    ph, boxes = phantom(slices, objects)
    t0 = time.perf_counter()
    if backend == "reference":
        from medsam_rt_export.lite import LiteReference
        from medsam_rt_export.lite_volume import reference_segment_volume

        ref = LiteReference.load()
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = reference_segment_volume(ref, ph.volume, boxes, reencode=True)
        labels, encoded = out.segs, out.encoded
    else:
        from medsam_rt import MedSAM

        model = MedSAM.load(model_dir, precision="fp32")
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = model.segment_volume(ph.volume, boxes)
        labels, encoded = out.labels, out.encoded
    seconds = time.perf_counter() - t1
    dice = []
    for k in range(1, objects + 1):
        a, b = labels == k, ph.truth == k
        dice.append(float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)))
    return {
        "backend": backend,
        "seconds": seconds,
        "load_s": load,
        "encoded": encoded,
        "dice_vs_truth": dice,
        "labels_sha": hashlib.sha256(labels.tobytes()).hexdigest()[:16],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def rss_worker(model_dir: Path, slices: int, objects: int) -> dict:
    """medsam-rt alone on a 512x512 x ``slices`` volume, ``objects`` boxes over staggered slice ranges."""
    from medsam_rt import MedSAM
    from medsam_rt.core.volume import ellipsoid_phantom

    specs = []
    for k in range(objects):  # staggered: the two sweeps overlap, so the embedding cache is used
        zc = slices * (0.2 + 0.6 * k / max(objects - 1, 1))
        angle = 2 * np.pi * k / objects
        specs.append(((zc, 256 + 140 * np.sin(angle), 256 + 140 * np.cos(angle)), (slices * 0.35, 40.0, 35.0)))
    ph = ellipsoid_phantom((slices, 512, 512), specs, seed=5)  # built slice by slice: the volume's bytes only
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = MedSAM.load(model_dir, precision="fp32")
    t0 = time.perf_counter()
    out = model.segment_volume(ph.volume, ph.boxes3d)
    seconds = time.perf_counter() - t0
    return {
        "backend": "medsam-rt",
        "slices": slices,
        "objects": objects,
        "seconds": seconds,
        "encoded": out.encoded,
        "reused": out.reused,
        "decoded": int(np.isfinite(out.scores).sum()),
        "rss_before_model_mib": base,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--objects", default="1,3,5", help="comma-separated object counts (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rss-slices", type=int, default=300, help="0 skips the memory case")
    ap.add_argument("--quick", action="store_true", help="12 slices, 1 and 3 objects, memory case of 60 slices")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model_dir, args.worker, args.slices, int(args.objects))))
        return
    if args.rss_worker:
        print(json.dumps(rss_worker(args.model_dir, args.rss_slices, int(args.objects))))
        return
    if args.quick:
        args.slices, args.objects, args.rss_slices = 12, "1,3", 60
    counts = [int(n) for n in args.objects.split(",") if n.strip()]  # "": the memory case alone
    hw = fingerprint()
    flags = set()
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        flags = set(line.split(":", 1)[1].split()) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    except (OSError, StopIteration):
        pass
    hw["flags"] = sorted(flags)
    rows = []
    for n in counts:
        runs: dict[str, list[dict]] = {"medsam-rt": [], "reference": []}
        for _ in range(args.rounds):
            for backend in runs:
                spec = ["--worker", backend, "--slices", str(args.slices), "--objects", str(n)]
                runs[backend].append(_run([str(args.model_dir), *spec]))
        for backend, rs in runs.items():
            rows.append(
                {
                    "benchmark": "volume",
                    "case": f"512x512x{args.slices}, {n} object(s) over every slice",
                    "objects": n,
                    "slices": args.slices,
                    "backend": backend,
                    "seconds_median": float(np.median([r["seconds"] for r in rs])),
                    "seconds_all": [round(r["seconds"], 3) for r in rs],
                    "load_s": float(np.median([r["load_s"] for r in rs])),
                    "encoded": rs[0]["encoded"],
                    "dice_vs_truth": rs[0]["dice_vs_truth"],
                    "labels_sha": rs[0]["labels_sha"],
                    "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                    "rounds": args.rounds,
                    "hardware": hw,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
    if args.rss_slices:
        r = _run([str(args.model_dir), "--rss-worker", "--rss-slices", str(args.rss_slices), "--objects", "5"])
        rows.append({"benchmark": "volume-memory", **r, "hardware": hw, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    lines = [
        f"LiteMedSAM fp32, {hw['cpu']} ({', '.join(hw['flags']) or 'no AVX2'}), {hw['cores']} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| case | medsam-rt s | reference s | ratio | 1/N | encoder runs (ours / ref) | same labels | Dice vs truth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        ours = next(r for r in rows if r.get("objects") == n and r["backend"] == "medsam-rt" and "case" in r)
        ref = next(r for r in rows if r.get("objects") == n and r["backend"] == "reference" and "case" in r)
        lines.append(
            f"| {ours['case']} | {ours['seconds_median']:.1f} | {ref['seconds_median']:.1f} | "
            f"{ours['seconds_median'] / ref['seconds_median']:.2f} | {1 / n:.2f} | "
            f"{ours['encoded']} / {ref['encoded']} | "
            f"{'yes' if ours['labels_sha'] == ref['labels_sha'] else 'no'} | "
            f"{min(ours['dice_vs_truth']):.3f} |"
        )
    mem = next((r for r in rows if r["benchmark"] == "volume-memory"), None)
    if mem:
        lines += [
            "",
            f"memory: 512x512x{mem['slices']}, {mem['objects']} objects: peak RSS {mem['peak_rss_mib']:.0f} MiB "
            f"({mem['seconds']:.0f} s, {mem['encoded']} encoder runs, {mem['reused']} embeddings kept between the "
            f"sweeps, {mem['decoded']} decodes)",
        ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"volume-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

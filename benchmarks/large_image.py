"""A 12000x12000 slide with 1000 objects through the real CLI: exit code, peak RSS, total time against the
decoder's time per box, and a request that cannot fit refused before the slow work.

    python benchmarks/large_image.py MODEL_DIR [--size 12000] [--boxes 1000] [--outputs npz,png] [--rounds 1]
        [--refuse-at 500M] [--out benchmarks/results]

The image is a phantom (benchmarks/phantoms.py: small ellipses on a noisy canvas) written as an 8-bit grayscale
PNG, its boxes as a ``--boxes`` file. Each ``medsam-rt segment`` run is its own process (``os.wait4``: that
child's own peak RSS and CPU time). The decoder's time per box is measured in its own process, alternating with
the CLI runs: ``MedSAM.segment`` with 16 boxes on the same image's embedding (decoder + exact mask crops), and the
decoder graph alone (``InferenceSession.run`` with 16 boxes); the target is total CLI time <= 1000 x (decoder time
per box at N = 16) + 20 %. Writes one JSON line per measurement (config, hardware, versions) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantoms import make_phantom  # noqa: E402

from medsam_rt.tools.bench import fingerprint  # noqa: E402


def write_case(folder: Path, size: int, boxes: int, seed: int = 0) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    radii = [(float(a), float(a * rng.uniform(0.7, 1.0))) for a in rng.uniform(10, 40, boxes)]
    ph = make_phantom(size, radii, seed=seed)
    if len(ph.boxes) < boxes:
        raise SystemExit(f"only {len(ph.boxes)} of {boxes} objects fit on {size}x{size}")
    image, box_file = folder / f"slide{size}.png", folder / f"boxes{boxes}.csv"
    Image.fromarray(ph.image).save(image, compress_level=1)
    box_file.write_text("".join(f"{int(b[0])},{int(b[1])},{int(b[2])},{int(b[3])}\n" for b in ph.boxes))
    return image, box_file


#: Runs the CLI and reports its own peak RSS (VmHWM: ru_maxrss would carry the forking parent's over exec).
CLI_CHILD = (
    "import sys; from medsam_rt.tools.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('VmHWM', hwm, file=sys.stderr); sys.exit(rc)"
)


def run_cli(args: list[str]) -> dict:
    """Run ``medsam-rt`` in a child process: exit code, wall time, its own peak RSS (VmHWM) and CPU time
    (``os.wait4``), stderr."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CLI_CHILD, *args], stderr=subprocess.PIPE, text=True)
    stderr = p.stderr.read() if p.stderr else ""
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    lines = stderr.splitlines()
    hwm = [int(line.split()[1]) for line in lines if line.startswith("VmHWM")]
    return {
        "rc": p.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(hwm[0] / 1024, 1) if hwm else None,
        "stderr": "\n".join(line for line in lines if not line.startswith("VmHWM")).strip()[-2000:],
    }


DECODER_WORKER = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
from PIL import Image
from medsam_rt import MedSAM
from medsam_rt.core.manifest import load_manifest
model_dir, image, box_file, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = MedSAM.load(model_dir, precision="fp32")
Image.MAX_IMAGE_PIXELS = None
emb = m.embed(np.asarray(Image.open(image)))
boxes = np.loadtxt(box_file, delimiter=",", ndmin=2)[:16]
seg, seg_cpu = [], []
for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time(); m.segment(emb, boxes)
    seg.append(time.perf_counter() - t); seg_cpu.append(time.process_time() - c)
graph = load_manifest(model_dir).graph("decoder", "fp32").path
s = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
scaled = (boxes * 256 / max(emb.original_size)).astype(np.float32)
feeds = {"image_embeddings": np.asarray(emb.embeddings), "boxes": scaled}
s.run(None, feeds)
raw, raw_cpu = [], []
for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time(); s.run(None, feeds)
    raw.append(time.perf_counter() - t); raw_cpu.append(time.process_time() - c)
med = lambda v: 1000 * float(np.median(v)) / 16
print(json.dumps({"segment_ms_per_box": med(seg), "decoder_ms_per_box": med(raw),
                  "segment_cpu_ms_per_box": med(seg_cpu), "decoder_cpu_ms_per_box": med(raw_cpu)}))
"""


def decoder_per_box(model_dir: Path, image: Path, box_file: Path, repeats: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", DECODER_WORKER, str(model_dir), str(image), str(box_file), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--size", type=int, default=12000)
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--outputs", default="npz,png")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="decoder calls per measurement (median)")
    ap.add_argument("--refuse-at", default="500M", help="--max-memory of the refusal case")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a.out.mkdir(parents=True, exist_ok=True)
    rows, env = [], fingerprint()
    with tempfile.TemporaryDirectory(prefix="large-image-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        image, box_file = write_case(folder, a.size, a.boxes)
        print(f"phantom {a.size}x{a.size}, {a.boxes} boxes: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        base = {"size": a.size, "boxes": a.boxes, "model": a.model_dir.name, "precision": "fp32", **env}
        for rnd in range(a.rounds):
            dec = decoder_per_box(a.model_dir, image, box_file, a.repeats)
            rows.append({**base, "round": rnd, "case": "decoder", **dec})
            print(rows[-1], file=sys.stderr)
            for fmt in a.outputs.split(","):
                out = folder / f"out.{fmt}"
                cli = ["segment", str(a.model_dir), str(image), "--boxes", str(box_file), "--out", str(out)]
                r = run_cli([*cli, "--precision", "fp32", "--quiet"])
                r["out_mib"] = round(out.stat().st_size / 2**20, 1) if out.exists() else None
                rows.append({**base, "round": rnd, "case": f"--out {fmt}", **r})
                print({k: v for k, v in rows[-1].items() if k not in env}, file=sys.stderr)
                out.unlink(missing_ok=True)
        refuse = [
            "segment",
            str(a.model_dir),
            str(image),
            "--boxes",
            str(box_file),
            "--out",
            str(folder / "x.png"),
            "--max-memory",
            a.refuse_at,
        ]
        r = run_cli([*refuse, "--precision", "fp32"])
        rows.append({**base, "case": f"refused at --max-memory {a.refuse_at}", **r})
        print({k: v for k, v in rows[-1].items() if k not in env}, file=sys.stderr)
    path = a.out / f"large-image-{stamp}"
    path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_suffix(".md").write_text(table(rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    dec = [r for r in rows if r["case"] == "decoder"]
    per_box = float(np.median([r["decoder_ms_per_box"] for r in dec])) if dec else float("nan")
    seg_box = float(np.median([r["segment_ms_per_box"] for r in dec])) if dec else float("nan")
    cpu_box = float(np.median([r.get("decoder_cpu_ms_per_box", np.nan) for r in dec])) if dec else float("nan")
    n = rows[0]["boxes"]
    target, cpu_target = 1.2 * n * per_box / 1000, 1.2 * n * cpu_box / 1000
    lines = [
        f"CPU: {rows[0].get('cpu')} ({rows[0].get('cores', '?')} cores); {rows[0]['size']}² image, {n} boxes",
        f"decoder per box at N=16: {per_box:.1f} ms (graph alone), {seg_box:.1f} ms (segment() with mask crops); "
        f"target total <= {n} x {per_box:.1f} ms + 20 % = {target:.1f} s; in CPU time (both threads): "
        f"{n} x {cpu_box:.1f} ms + 20 % = {cpu_target:.1f} s",
        "",
        "| case | exit | wall s | CPU s | peak RSS MiB | output MiB | wall vs target | CPU vs CPU target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["case"] == "decoder":
            continue
        ratio = f"{r['wall_s'] / target:.2f}x" if r["rc"] == 0 else "-"
        cpu_ratio = f"{r['cpu_s'] / cpu_target:.2f}x" if r["rc"] == 0 else "-"
        lines.append(
            f"| {r['case']} | {r['rc']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mib']} | "
            f"{r.get('out_mib') or '-'} | {ratio} | {cpu_ratio} |"
        )
    refused = [r for r in rows if r["case"].startswith("refused")]
    if refused:
        lines += ["", f"refusal message: `{refused[-1]['stderr']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

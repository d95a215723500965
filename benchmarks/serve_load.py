"""`medsam-rt serve` on loopback: its overhead over the library, a concurrent load, and the page's two decoders.

Questions (LiteMedSAM on this machine):

1. overhead: ``POST /segment`` round trip for one box (HTTP + JSON + label PNG) vs the library's ``segment`` for
   the same box on the same embedding. The library runs in its own process, rounds alternate (server, library,
   server, ...), both with the same ONNX Runtime threads; target p50 ratio <= 1.2.
2. load: ``--clients`` concurrent clients x ``--requests`` segment requests each on a few real images (random
   boxes, seeded): errors (must be 0), lost requests (0), latency p50/p95/max, throughput, and the server's RSS
   after a warm-up vs at the end and at its peak (target growth <= 50 MiB).
3. page (``--browser``, needs chromium + playwright + ``make -C web``): box -> mask in the page, in-browser
   decoder (onnxruntime-web) vs server round trip, on the same drags.

Every request goes to 127.0.0.1; every loop is bounded in count and time. One JSON row per measurement goes to
``--out`` (default benchmarks/results/serve-<date>.jsonl), with the CPU, its flags and the library versions.

    python benchmarks/serve_load.py models/litemedsam --browser
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medsam_rt.tools.serve.launch import Client, ServerProcess

ROOT = Path(__file__).resolve().parents[1]

LIBRARY_CHILD = r"""
import json, sys, time
import numpy as np
from medsam_rt import MedSAM
from medsam_rt.io.formats import display_range, parse_window, read_scan, to_display
model = MedSAM.load(sys.argv[1], precision="fp32", threads=int(sys.argv[2]))
path, box = sys.argv[3], json.loads(sys.argv[4])
scan = read_scan(path)
emb = model.embed(to_display(scan.values[0], display_range(scan, parse_window("auto"))))
model.segment(emb, [box])
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.segment(emb, [box])
        out.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(out), flush=True)
"""


def machine() -> dict:
    info = {"cpu": platform.processor(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        info["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    import onnxruntime

    import medsam_rt

    info["versions"] = {
        "medsam-rt": medsam_rt.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    for name in ("fastapi", "uvicorn", "playwright"):
        try:
            info["versions"][name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return info


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if values else float("nan")


def sample_images() -> list[tuple[str, bytes, tuple[int, int]]]:
    """A few real images as files: (name, bytes, (H, W))."""
    out = []
    try:
        from pydicom.data import get_testdata_file

        for name in ("CT_small.dcm", "MR_small.dcm"):
            p = Path(get_testdata_file(name))
            out.append((name, p.read_bytes(), (128, 128) if name.startswith("CT") else (64, 64)))
    except ImportError:
        pass
    from medsam_rt.tools.samples import ellipse_phantom

    ph = ellipse_phantom(512, 512, seed=3).image
    buf = io.BytesIO()
    Image.fromarray(ph).save(buf, format="PNG")
    out.append(("phantom512.png", buf.getvalue(), ph.shape[:2]))
    return out


def random_box(rng: np.random.Generator, hw: tuple[int, int]) -> list[int]:
    h, w = hw
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    return [x0, y0, int(rng.integers(x0 + 4, w + 1)), int(rng.integers(y0 + 4, h + 1))]


def overhead(srv: ServerProcess, args, rows: list[dict], base: dict) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    box = [45, 40, 75, 65]
    c = Client(srv.url)
    iid = c.upload(Path(path).read_bytes(), "CT_small.dcm").json()["id"]
    child = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_CHILD, str(args.model_dir), str(args.threads), path, json.dumps(box)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    server_ms, server_total, lib_ms = [], [], []
    for _ in range(3):  # warm-up both
        c.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": [box]})
    child.stdin.write("3\n")
    child.stdin.flush()
    child.stdout.readline()
    for _ in range(args.rounds):
        for _ in range(args.per_round):
            t0 = time.perf_counter()
            r = c.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": [box]})
            server_ms.append((time.perf_counter() - t0) * 1e3)
            server_total.append(r.json()["ms"]["decode"])
        child.stdin.write(f"{args.per_round}\n")
        child.stdin.flush()
        lib_ms += json.loads(child.stdout.readline())
    child.stdin.close()
    child.wait(timeout=30)
    row = {
        **base,
        "measure": "segment_overhead",
        "image": "CT_small.dcm 128x128",
        "box": box,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "server_round_trip_ms": {"p50": pct(server_ms, 50), "p95": pct(server_ms, 95)},
        "server_decode_ms": {"p50": pct(server_total, 50)},
        "library_segment_ms": {"p50": pct(lib_ms, 50), "p95": pct(lib_ms, 95)},
        "ratio_p50": pct(server_ms, 50) / pct(lib_ms, 50),
    }
    rows.append(row)
    print(
        f"overhead: server round trip p50 {row['server_round_trip_ms']['p50']:.1f} ms, library segment p50 "
        f"{row['library_segment_ms']['p50']:.1f} ms: {row['ratio_p50']:.2f}x",
        flush=True,
    )


def load(srv: ServerProcess, args, rows: list[dict], base: dict) -> None:
    c = Client(srv.url)
    images = [(c.upload(data, name).json()["id"], name, hw) for name, data, hw in sample_images()]
    rng = np.random.default_rng(0)
    for iid, _, hw in images:  # warm-up: every image embedded, allocator pools grown
        for _ in range(4):
            c.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": [random_box(rng, hw)]})
    rss_start = srv.rss_bytes()
    peak = [rss_start]
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], srv.rss_bytes())

    latencies: list[float] = []
    errors: list[str] = []
    answered = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def client(n: int) -> None:
        crng = np.random.default_rng(100 + n)
        cc = Client(srv.url, timeout_s=120)
        for i in range(args.requests):
            if time.monotonic() > deadline:
                with lock:
                    errors.append("deadline")
                return
            iid, _, hw = images[(n + i) % len(images)]
            t0 = time.perf_counter()
            try:
                r = cc.request("POST", f"/v1/images/{iid}/segment", json_body={"boxes": [random_box(crng, hw)]})
                ok = r.status == 200 and "labels_png" in r.json()
                msg = None if ok else f"{r.status} {r.data[:200]!r}"
            except Exception as exc:  # a lost request is an error here
                msg = f"{type(exc).__name__}: {exc}"
            with lock:
                answered[0] += 1
                latencies.append((time.perf_counter() - t0) * 1e3)
                if msg:
                    errors.append(msg)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    mon.join()
    rss_end = srv.rss_bytes()
    sent = args.clients * args.requests
    row = {
        **base,
        "measure": "load",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "images": [name for _, name, _ in images],
        "sent": sent,
        "answered": answered[0],
        "errors": len(errors),
        "error_samples": errors[:5],
        "lost": sent - answered[0],
        "latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "max": max(latencies or [0])},
        "throughput_rps": answered[0] / wall,
        "wall_s": wall,
        "rss_mib": {"start": rss_start / 2**20, "end": rss_end / 2**20, "peak": peak[0] / 2**20},
        "rss_growth_mib": (rss_end - rss_start) / 2**20,
    }
    rows.append(row)
    print(
        f"load: {answered[0]}/{sent} answered, {len(errors)} errors, p50 {row['latency_ms']['p50']:.0f} ms, "
        f"p95 {row['latency_ms']['p95']:.0f} ms, {row['throughput_rps']:.1f} req/s, RSS {row['rss_mib']['start']:.0f}"
        f" -> {row['rss_mib']['end']:.0f} MiB (peak {row['rss_mib']['peak']:.0f})",
        flush=True,
    )


def page(srv: ServerProcess, args, rows: list[dict], base: dict) -> None:
    from playwright.sync_api import sync_playwright

    from medsam_rt.tools.samples import ellipse_phantom

    ph = ellipse_phantom(512, 512, seed=3).image
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "serve-bench-phantom512.png"
    Image.fromarray(ph).save(tmp)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        for mode in ("browser", "server"):
            pg = b.new_page(viewport={"width": 1100, "height": 720})
            pg.goto(f"{srv.url}/?decoder={mode}")
            got = pg.evaluate("window.medsam.ready")
            detail = pg.evaluate("window.medsam.state.modeDetail")
            if got != mode:
                print(f"page: {mode} decoder unavailable ({detail})", flush=True)
                pg.close()
                continue
            pg.set_input_files("#file", str(tmp))
            pg.wait_for_function(
                "window.medsam.state.image !== null && window.medsam.state.bitmaps.size > 0", timeout=120000
            )
            r = pg.locator("#boxes").bounding_box()
            s = r["width"] / 512
            rng = np.random.default_rng(5)
            for i in range(args.drags):  # separate boxes, each drawn and decoded once it is released
                x0, y0, x1, y1 = random_box(rng, (512, 512))
                pg.mouse.move(r["x"] + x0 * s, r["y"] + y0 * s)
                pg.mouse.down()
                pg.mouse.move(r["x"] + x1 * s, r["y"] + y1 * s)
                pg.mouse.up()
                pg.evaluate("window.medsam.idle()")
                if i % 4 == 3:  # keep few boxes on the slice (redrawing all masks is part of each timing)
                    pg.keyboard.press("Delete")
            t = [x["ms"] for x in pg.evaluate("window.medsam.timings()")][2:]  # the first two warm up
            row = {
                **base,
                "measure": "page_box_to_mask",
                "mode": mode,
                "detail": detail,
                "image": "phantom 512x512",
                "drags": args.drags,
                "samples": len(t),
                "box_to_mask_ms": {"p50": pct(t, 50), "p95": pct(t, 95)},
            }
            rows.append(row)
            print(
                f"page ({mode}): box -> mask p50 {row['box_to_mask_ms']['p50']:.0f} ms, p95 "
                f"{row['box_to_mask_ms']['p95']:.0f} ms ({detail})",
                flush=True,
            )
            pg.close()
        b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="the load stops by itself after this")
    ap.add_argument("--browser", action="store_true", help="also time the page's two decoders (chromium)")
    ap.add_argument("--drags", type=int, default=12)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--skip", default="", help="comma list of overhead,load to skip")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{stamp}.jsonl"
    base = {
        "benchmark": "serve_load",
        "time": stamp,
        "model_dir": args.model_dir.name,
        "threads": args.threads,
        "machine": machine(),
    }
    rows: list[dict] = []
    skip = set(filter(None, args.skip.split(",")))
    with ServerProcess(args.model_dir, "--threads", str(args.threads), "--max-queue", "256") as srv:
        if "overhead" not in skip:
            overhead(srv, args, rows, base)
        if "load" not in skip:
            load(srv, args, rows, base)
        if args.browser:
            page(srv, args, rows, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

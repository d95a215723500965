"""``medsam-rt batch`` throughput on this machine: jobs/s for 1 and 2 workers with each engine (local process
pool, Ray Data on a local Ray instance), Ray's overhead against local at equal workers, peak memory per worker.

    python benchmarks/batch_throughput.py MODEL_DIR [--jobs 24] [--rounds 2] [--workers 1,2]
        [--engines local,ray] [--precision fp32] [--out benchmarks/results]

Jobs: ``--jobs`` PNG images (phantoms of 160-512 px and the real samples of medsam_rt.tools.samples, cycled), one to two
boxes each. Every configuration runs as its own ``medsam-rt batch ... --json`` process (a cold start, as a user
runs it: Ray starts its local instance inside it), the configurations alternating within each round, into a fresh
output folder. Per run: wall time of the process, the batch's own ``seconds`` (job list read to last outcome),
``startup`` (engine start to first outcome: process pool spawn or Ray start, model loads, first job),
``steady_throughput`` (jobs after the first per second, between the first and the last outcome: engine start left
out) and the per-stage seconds from the workers. Peak memory: ``/proc/PID/status`` VmHWM of every worker process
(local: the driver's spawned children; ray: the ``ray::MapWorker`` actor processes), sampled every 0.5 s, and of
the driver. Writes one JSON line per run (config, hardware, versions, load average) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medsam_rt.tools.bench import fingerprint


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags.split()]


def make_jobs(folder: Path, count: int) -> Path:
    """``count`` PNG jobs (phantoms and real samples, cycled) and their jobs.jsonl."""
    from medsam_rt.tools.samples import ellipse_phantom, real_samples, two_ellipse_phantom

    pool = [ellipse_phantom(160 + 32 * k, 512 - 24 * k, seed=k) for k in range(6)] + [two_ellipse_phantom()]
    pool += [s for s in real_samples() if s.image.dtype == np.uint8]
    lines = []
    for k in range(count):
        sample = pool[k % len(pool)]
        Image.fromarray(sample.image).save(folder / f"img{k:03d}.png")
        lines.append(json.dumps({"image": f"img{k:03d}.png", "boxes": sample.boxes.tolist()}))
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kib(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


class MemorySampler(threading.Thread):
    """Peak RSS (VmHWM, MiB) per worker process and of the driver, sampled until stopped."""

    def __init__(self, driver: int, engine: str) -> None:
        super().__init__(daemon=True)
        self.driver, self.engine = driver, engine
        self.peaks: dict[int, float] = {}
        self.driver_peak = 0.0
        self.stop = threading.Event()
        self._scanned, self._actors = 0.0, []

    def _workers(self) -> list[int]:
        """Local: the driver's children (one small read); ray: ``ray::MapWorker`` processes, the whole of /proc
        scanned once a second at most (the sampler's own CPU comes out of the machine the workers run on)."""
        if self.engine == "local":
            kids = []
            for task in Path(f"/proc/{self.driver}/task").glob("*/children"):
                try:
                    kids += [int(p) for p in task.read_text().split()]
                except OSError:
                    continue
            return [p for p in kids if b"spawn_main" in _cmdline(p) and b"resource_tracker" not in _cmdline(p)]
        now = time.monotonic()
        if now - self._scanned > 1.0:
            self._scanned = now
            self._actors = [
                int(e) for e in os.listdir("/proc") if e.isdigit() and _cmdline(int(e)).startswith(b"ray::MapWorker")
            ]
        return self._actors

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.driver_peak = max(self.driver_peak, _kib(_status(self.driver).get("VmHWM")) / 1024)
            for pid in self._workers():
                peak = _kib(_status(pid).get("VmHWM")) / 1024
                if peak > 0:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak)


def run_once(model_dir: Path, jobs: Path, engine: str, workers: int, precision: str, scratch: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{engine}{workers}-", dir=scratch))
    command = [sys.executable, "-m", "medsam_rt.tools.cli", "batch", str(model_dir), str(jobs), "--out", str(out)]
    command += ["--engine", engine, "--workers", str(workers), "--precision", precision, "--json"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid, engine)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=1800)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} x{workers} failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(stdout)
    ran = summary["succeeded"] + summary["failed"]
    return {
        "engine": engine,
        "workers": workers,
        "threads": summary["threads"],
        "jobs": ran,
        "wall_s": round(wall, 3),
        "wall_jobs_per_s": round(ran / wall, 4),
        "batch_s": summary["seconds"],
        "startup_s": summary["startup"],
        "jobs_per_s": summary["throughput"],
        "steady_jobs_per_s": summary["steady_throughput"],
        "ms_per_job": {k: round(v / ran * 1000, 1) for k, v in summary["stages"].items()},
        "worker_peak_rss_mib": sorted(round(v, 1) for v in sampler.peaks.values()),
        "driver_peak_rss_mib": round(sampler.driver_peak, 1),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r["workers"]), []).append(r)

    def med(key: str, rs: list[dict]) -> float:
        return statistics.median(r[key] for r in rs)

    lines = [
        "| engine | workers x threads | runs | jobs/s (wall) | jobs/s (steady) | startup s | model ms/job | "
        "worker peak RSS MiB | driver MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, workers), rs in sorted(groups.items()):
        peaks = [p for r in rs for p in r["worker_peak_rss_mib"]]
        lines.append(
            f"| {engine} | {workers} x {rs[0]['threads']} | {len(rs)} | {med('wall_jobs_per_s', rs):.3f} | "
            f"{med('steady_jobs_per_s', rs):.3f} | {med('startup_s', rs):.1f} | "
            f"{statistics.median(r['ms_per_job'].get('model', 0) for r in rs):.0f} | "
            f"{max(peaks) if peaks else 'n/a'} | {max(r['driver_peak_rss_mib'] for r in rs)} |"
        )
    lines.append("")
    for workers in sorted({w for _, w in groups}):
        local, ray = groups.get(("local", workers)), groups.get(("ray", workers))
        if local and ray:
            wall = med("wall_jobs_per_s", local) / med("wall_jobs_per_s", ray) - 1
            steady = med("steady_jobs_per_s", local) / med("steady_jobs_per_s", ray) - 1
            lines.append(
                f"- {workers} worker(s): Ray's overhead against local {100 * steady:+.1f} % in steady state "
                f"(time per job), {100 * wall:+.1f} % end to end with Ray's start"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    engines = args.engines.split(",")
    info = fingerprint() | {"cpu_flags": cpu_flags()}
    try:
        from importlib import metadata

        info["versions"] = info.get("versions", {}) | {"ray": metadata.version("ray")}
    except Exception:
        pass
    rows = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as scratch:
        jobs = make_jobs(Path(scratch), args.jobs)
        for rnd in range(args.rounds):
            configs = [(e, w) for w in workers for e in engines]
            if rnd % 2:
                configs.reverse()  # alternate the order: drift in the machine's load hits every config alike
            for engine, w in configs:
                row = run_once(args.model_dir, jobs, engine, w, args.precision, Path(scratch))
                row |= {"round": rnd, "precision": args.precision, "model_dir": str(args.model_dir), **info}
                rows.append(row)
                print(json.dumps({k: row[k] for k in list(row)[:14]}), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"batch-throughput-{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = (
        f"# batch throughput {stamp}\n\n{info.get('cpu')}, flags {' '.join(info['cpu_flags'])}, "
        f"{os.cpu_count()} CPUs; {args.jobs} jobs, {args.rounds} round(s), {args.precision}\n\n{table(rows)}\n"
    )
    (args.out / f"batch-throughput-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

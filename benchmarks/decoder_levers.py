"""What each lever of the box-prompt decoder graph buys, on LiteMedSAM's trained weights (the decoder alone).

    python benchmarks/decoder_levers.py [--rounds 5] [--repeats 10] [--work DIR] [--out benchmarks/results]

Backends, each in its own subprocess (loaded once, warm-up per box count), measured in alternating rounds (the
order reversed every other round) so that ratios survive a noisy machine; one JSON line per backend and box count
(every config field, CPU, flags, versions; median, p95, min over all rounds) and a markdown table:

- ``pytorch``: segment-anything's prompt encoder + mask decoder on LiteMedSAM's modules (``torch.set_num_threads(2)``
  as the issue states; ``segment_anything_decode``), the reference the targets are stated against;
- ``old``: the decoder graph medsam-rt exported before (the library's modules traced, optimised as the pipeline does);
- ``lever:<name>``: :class:`~medsam_rt_export.fast_decoder.FastBoxDecoder` with the levers switched on one after the
  other (the last one is what ``medsam-rt export`` writes); the predicted column is the multiply-add count;
- ``session:<name>``: the exported graph at N = 1 under other ONNX Runtime session options.

``--profile`` adds ONNX Runtime's profile (time per op type, top nodes) of the exported graph at N = 1 and 16.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
THREADS = 2  # default --threads: PyTorch's (the issue's setting) and ONNX Runtime's (physical cores here)
#: (name, the lever's Levers fields), switched on cumulatively in this order; the last row is the default.
LEVER_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("tokens-major, 1 mask token (all folds off)", {}),
    ("residual LayerNorm on 2-D views (no SkipLayerNormalization)", {"norm_2d": True}),
    ("token->image: K into queries, V after P (3 attentions)", {"fold_token_to_image": True}),
    ("image->token: output projection into the values (2)", {"fold_image_to_token_out": True}),
    ("image->token: query projection into the keys (2)", {"fold_image_to_token_query": True}),
    ("final attention: 2 queries", {"final_two_queries": True}),
    ("bias adds over the image tokens folded", {"fold_biases": True}),
    ("upscaling as 2 Gemms on the tokens (not ConvTranspose)", {"upscale": "matmul"}),
]
#: ONNX Runtime's settings as medsam_rt/core/providers.py creates sessions (allow_spinning: ONNX Runtime's default).
DEFAULT_SESSION = {"threads": THREADS, "opt_level": "all", "allow_spinning": True, "mem_pattern": True, "arena": True}
SESSION_SETS: dict[str, dict[str, Any]] = {
    "default (providers.py: ENABLE_ALL, threads=cores)": {},
    "threads=1": {"threads": 1},
    "spinning off": {"allow_spinning": False},
    "optimisation basic": {"opt_level": "basic"},
    "optimisation extended": {"opt_level": "extended"},
    "memory pattern off": {"mem_pattern": False},
    "cpu arena off": {"arena": False},
}
#: The first block's image-side projections shared by the boxes of a call (an If on N), against the default (never):
#: name -> share_first_block, measured at these box counts.
SHARE_SETS = {"share:from 3": 3, "share:always": 1}
SHARE_CHECK = (1, 2, 3, 4, 16)


def levers_at(step: int) -> dict[str, Any]:
    from medsam_rt_export.fast_decoder import Levers

    fields = Levers.none().as_dict()
    for _, change in LEVER_STEPS[: step + 1]:
        fields.update(change)
    return fields


# -- graphs ----------------------------------------------------------------------------------------------------------


def build_graph(work: Path, net: Any, levers: dict[str, Any] | None, python_optimizer: bool = True) -> Path:
    """Export + optimise (as ``medsam-rt export`` does) one decoder graph into ``work``, cached by its config.

    ``python_optimizer=False``: only ONNX Runtime's own session-time optimisation (the transformer optimizer
    breaks graphs whose If branches read outer values: it drops a Transpose they use).
    """
    import medsam_rt_export.fast_decoder as fd
    from medsam_rt_export.fast_decoder import FastBoxDecoder, Levers
    from medsam_rt_export.graphs import SegmentAnythingDecoderGraph, export_decoder_graph
    from medsam_rt_export.optimize import export_friendly, optimize

    code = Path(fd.__file__).read_bytes()  # a changed module invalidates the cached graphs
    config = json.dumps([levers, python_optimizer], sort_keys=True).encode()
    key = hashlib.sha256(config + code).hexdigest()[:12]
    path = work / f"decoder-{'old' if levers is None else key}.onnx"
    if path.is_file():
        return path
    raw = path.with_suffix(".raw.onnx")
    if levers is None:
        module = SegmentAnythingDecoderGraph(net.prompt_encoder, net.mask_decoder).eval()
    else:
        module = FastBoxDecoder.from_segment_anything(net.prompt_encoder, net.mask_decoder, Levers(**levers))
    with export_friendly(net):
        export_decoder_graph(module, raw, 256, 256, 18)
    if python_optimizer:
        optimize(raw, path)
        raw.unlink()
    else:
        raw.rename(path)
    return path


def embedding(work: Path, net: Any) -> Path:
    """LiteMedSAM's embedding of the 512x512 ellipse phantom (a real embedding, not noise)."""
    import torch

    from medsam_rt.tools.samples import ellipse_phantom
    from medsam_rt_export.lite import LiteReference

    path = work / "embedding.npy"
    if not path.is_file():
        with torch.no_grad():
            emb = LiteReference(net).embed(np.repeat(ellipse_phantom(512, 512, seed=1).image[..., None], 3, 2))[0]
        np.save(path, emb.numpy())
    return path


def boxes_for(n: int) -> np.ndarray:
    """``n`` boxes in the 256 frame, different from the tracing boxes."""
    rng = np.random.default_rng(1000 + n)
    xy = rng.uniform(5, 140, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(25, 110, (n, 2))], axis=1).astype(np.float32)


# -- workers ---------------------------------------------------------------------------------------------------------


def _session(graph: str, opts: dict[str, Any], threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(opts.get("threads", threads))
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[opts.get("opt_level", "all")]
    if "allow_spinning" in opts:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts["allow_spinning"] else "0")
    so.enable_mem_pattern = bool(opts.get("mem_pattern", True))
    so.enable_cpu_mem_arena = bool(opts.get("arena", True))
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def worker(spec: dict[str, Any], emb_path: str) -> None:
    """Serve ``N REPEATS`` lines on stdin with a JSON list of seconds per call on stdout."""
    emb = np.load(emb_path)
    if spec["kind"] == "pytorch":
        import torch

        from medsam_rt_export.graphs import segment_anything_decode
        from medsam_rt_export.lite import load_lite_net

        torch.set_num_threads(spec["threads"])
        net = load_lite_net()[0]
        emb_t = torch.from_numpy(emb)

        def run(boxes: np.ndarray) -> None:
            with torch.no_grad():
                segment_anything_decode(net.prompt_encoder, net.mask_decoder, emb_t, torch.from_numpy(boxes))

    else:
        opts = {"allow_spinning": False} if spec["no_spin"] else {}
        sess = _session(spec["graph"], {**opts, **spec.get("session", {})}, spec["threads"])

        def run(boxes: np.ndarray) -> None:
            sess.run(None, {"image_embeddings": emb, "boxes": boxes})

    warm: set[int] = set()
    print("ready", flush=True)
    for line in sys.stdin:
        n, repeats = (int(v) for v in line.split())
        boxes = boxes_for(n)
        if n not in warm:
            for _ in range(2):
                run(boxes)
            warm.add(n)
        times = []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            run(boxes)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        print(json.dumps(times), flush=True)


class Worker:
    def __init__(self, spec: dict[str, Any], emb_path: Path) -> None:
        self.spec = spec
        cmd = [sys.executable, str(HERE), "--worker", json.dumps(spec), "--embedding", str(emb_path)]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if spec["no_spin"] else None  # before torch loads
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {spec['name']} did not start (exit code {self.proc.poll()})")

    def measure(self, n: int, repeats: int) -> list[list[float]]:
        self.proc.stdin.write(f"{n} {repeats}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec['name']} died (exit code {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def profile(graph: Path, emb_path: Path, n: int, threads: int, runs: int = 10) -> dict[str, Any]:
    """ONNX Runtime's profile of ``graph`` at ``n`` boxes: ms per run by op type and the 12 costliest nodes."""
    import collections

    prefix = str(graph.with_name(f"profile-{n}"))
    sess = _session(str(graph), {}, threads, profile=prefix)
    feeds = {"image_embeddings": np.load(emb_path), "boxes": boxes_for(n)}
    for _ in range(3):
        sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            shape = e["args"].get("output_type_shape", "")
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[f"{e['args']['op_name']} {e['name'][: -len('_kernel_time')]} -> {shape}"] += e["dur"]
    total = sum(by_op.values())
    per_run = runs + 3  # the profile covers the warm-up runs too
    return {
        "n_boxes": n,
        "kernel_ms_per_run": total / per_run / 1e3,
        "by_op_ms": {k: round(v / per_run / 1e3, 3) for k, v in by_op.most_common()},
        "top_nodes_ms": {k: round(v / per_run / 1e3, 3) for k, v in by_node.most_common(12)},
    }


def _stats(times: list[list[float]], n: int) -> dict[str, float]:
    """Wall-clock stats, and the process's CPU time per call (all its threads; with one thread and no spinning it
    is the compute time without the time the process waited for a core on a loaded machine)."""
    wall, cpu = (np.array(t) * 1e3 for t in zip(*times, strict=True))
    return {
        "median_ms": float(np.median(wall)),
        "p95_ms": float(np.percentile(wall, 95)),
        "min_ms": float(wall.min()),
        "per_box_median_ms": float(np.median(wall)) / n,
        "cpu_median_ms": float(np.median(cpu)),
        "cpu_per_box_median_ms": float(np.median(cpu)) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per round at N = 1 (N = 16: a third)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medsam-rt-decoder-levers"), help="graph cache")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results")
    ap.add_argument("--parts", default="targets,levers,session,share", help="subset of targets,levers,session,share")
    ap.add_argument("--threads", type=int, default=THREADS, help="PyTorch's and ONNX Runtime's threads")
    ap.add_argument(
        "--no-spin",
        action="store_true",
        help="no busy-waiting threads (PyTorch OMP_WAIT_POLICY=PASSIVE, ONNX Runtime allow_spinning=0): "
        "fairer when other processes load the machine",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--embedding", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.embedding)
        return

    import warnings

    from medsam_rt.tools.bench import fingerprint
    from medsam_rt_export.lite import load_lite_net

    warnings.simplefilter("ignore")
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    from medsam_rt_export.fast_decoder import FastBoxDecoder, Levers, decoder_macs

    net = load_lite_net()[0]
    dims = FastBoxDecoder.from_segment_anything(net.prompt_encoder, net.mask_decoder).dims
    emb_path = embedding(args.work, net)
    default = levers_at(len(LEVER_STEPS) - 1)
    if Levers(**default) != Levers():
        raise RuntimeError(f"the last lever step {default} is not FastBoxDecoder's default {Levers()}")
    specs: list[dict[str, Any]] = [{"name": "pytorch", "kind": "pytorch", "levers": None, "box_counts": [1, 16]}]
    specs.append({"name": "old", "kind": "ort", "levers": None, "graph": str(build_graph(args.work, net, None))})
    specs[-1]["box_counts"] = [1, 16]
    steps = range(len(LEVER_STEPS)) if "levers" in parts else [len(LEVER_STEPS) - 1]
    for i in steps:
        lev = levers_at(i)
        graph = str(build_graph(args.work, net, lev))
        specs.append({"name": f"lever:{i}", "kind": "ort", "levers": lev, "graph": graph, "box_counts": [1, 16]})
    new_graph = specs[-1]["graph"]
    if "share" in parts:
        for name, share in {"share:never": 0, **SHARE_SETS}.items():  # all without the Python optimizer (see above)
            lev = {**default, "share_first_block": share}
            graph = str(build_graph(args.work, net, lev, python_optimizer=False))
            specs.append(
                {
                    "name": name,
                    "kind": "ort",
                    "levers": lev,
                    "graph": graph,
                    "box_counts": list(SHARE_CHECK),
                    "python_optimizer": False,
                }
            )
    if "session" in parts:
        for name, opts in list(SESSION_SETS.items())[1:]:
            specs.append(
                {
                    "name": f"session:{name}",
                    "kind": "ort",
                    "levers": default,
                    "graph": new_graph,
                    "session": opts,
                    "box_counts": [1],
                }
            )
    if "targets" not in parts and "levers" not in parts:
        specs = [s for s in specs if s["name"] not in ("pytorch", "old")]

    fp = fingerprint()
    flags = sorted(
        {f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}
    )
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    for s in specs:
        s["threads"], s["no_spin"] = args.threads, args.no_spin
    workers = [Worker(s, emb_path) for s in specs]
    times: dict[tuple[str, int], list[list[float]]] = {}
    try:
        for r in range(args.rounds):
            order = workers if r % 2 == 0 else workers[::-1]
            for n in sorted({n for s in specs for n in s["box_counts"]}):
                reps = args.repeats if n <= 4 else max(1, args.repeats // 3)
                for w in order:
                    if n in w.spec["box_counts"]:
                        times.setdefault((w.spec["name"], n), []).extend(w.measure(n, reps))
            print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.close()
    rows = []
    spin = {"allow_spinning": False} if args.no_spin else {}
    for s in specs:
        for n in s["box_counts"]:
            rows.append(
                {
                    "benchmark": "decoder_levers",
                    "backend": s["name"],
                    "kind": s["kind"],
                    "model": "litemedsam",
                    "graph": Path(s["graph"]).name if "graph" in s else None,
                    "python_optimizer": s.get("python_optimizer", True) if s["kind"] == "ort" else None,
                    "levers": s["levers"],
                    "session": {**DEFAULT_SESSION, "threads": args.threads, **spin, **s.get("session", {})}
                    if s["kind"] == "ort"
                    else {"torch_threads": args.threads, "OMP_WAIT_POLICY": "PASSIVE" if args.no_spin else None},
                    "threads": s.get("session", {}).get("threads", args.threads),
                    "no_spin": args.no_spin,
                    "n_boxes": n,
                    "lever_step": LEVER_STEPS[int(s["name"][6:])][0] if s["name"].startswith("lever:") else None,
                    "gmac": decoder_macs(dims, n, Levers(**s["levers"]) if s["levers"] else None) / 1e9,
                    "samples": len(times[(s["name"], n)]),
                    "rounds": args.rounds,
                    **_stats(times[(s["name"], n)], n),
                    "cpu": fp["cpu"],
                    "cpu_flags": flags,
                    "cores": fp["cores"],
                    "versions": fp["versions"],
                    "load_avg_before_after": [load_before[0], os.getloadavg()[0]],
                    "started": started.isoformat(timespec="seconds"),
                }
            )
    if args.profile:
        for n in (1, 16):
            row = profile(Path(new_graph), emb_path, n, args.threads)
            rows.append({"benchmark": "decoder_levers", "backend": "profile", "threads": args.threads, **row})
    stamp = started.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"decoder-levers-{stamp}.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = report(rows)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)


def report(rows: list[dict[str, Any]]) -> str:
    """Markdown: targets, the lever table (predicted MACs, measured time change), share threshold, session options."""
    med = {(r["backend"], r["n_boxes"]): r for r in rows if "median_ms" in r}
    r0 = rows[0]
    spin = "no spinning" if r0.get("no_spin") else "spinning (defaults)"
    lines = [f"CPU: {r0['cpu']} ({', '.join(r0['cpu_flags'])}), {r0['cores']} cores, {r0['threads']} threads, {spin}"]
    lines += [f"load average before, after: {r0['load_avg_before_after']}; ms", ""]
    new = f"lever:{len(LEVER_STEPS) - 1}"
    if ("pytorch", 1) in med and (new, 1) in med:
        head = "| backend | N=1 median | p95 | vs PyTorch | N=16 per box | p95 per box | vs PyTorch | GMAC/box N=1 |"
        lines += [head + " CPU ms N=1 | vs PyTorch | CPU ms/box N=16 | vs PyTorch |", "|---" * 12 + "|"]
        for name, label in (("pytorch", "PyTorch segment-anything decoder"), ("old", "old graph"), (new, "new graph")):
            a, b = med[(name, 1)], med[(name, 16)]
            pt1, pt16 = med[("pytorch", 1)], med[("pytorch", 16)]
            lines.append(
                f"| {label} | {a['median_ms']:.1f} | {a['p95_ms']:.1f} | {a['median_ms'] / pt1['median_ms']:.2f}x | "
                f"{b['per_box_median_ms']:.1f} | {b['p95_ms'] / 16:.1f} | "
                f"{b['per_box_median_ms'] / pt16['per_box_median_ms']:.2f}x | {a['gmac']:.2f} |"
            )
            if "cpu_median_ms" in a:
                lines[-1] += (
                    f" {a['cpu_median_ms']:.1f} | {a['cpu_median_ms'] / pt1['cpu_median_ms']:.2f}x | "
                    f"{b['cpu_per_box_median_ms']:.1f} | "
                    f"{b['cpu_per_box_median_ms'] / pt16['cpu_per_box_median_ms']:.2f}x |"
                )
        lines.append("")
    if ("lever:0", 1) in med:
        lines += ["| lever (added to the row above; the first row vs the old graph) | predicted GMAC/box N=1 / N=16 | "]
        lines[-1] += "measured ms change N=1 | N=16 per box | kept |"
        lines += ["|---|---|---|---|---|"]
        prev = "old"
        for i, (name, _) in enumerate(LEVER_STEPS):
            cur = f"lever:{i}"
            d_mac = [(med[(cur, n)]["gmac"] - med[(prev, n)]["gmac"]) / n for n in (1, 16)]
            d1 = med[(cur, 1)]["median_ms"] - med[(prev, 1)]["median_ms"]
            d16 = med[(cur, 16)]["per_box_median_ms"] - med[(prev, 16)]["per_box_median_ms"]
            p1, p16 = (d1 / med[(prev, 1)]["median_ms"], d16 / med[(prev, 16)]["per_box_median_ms"])
            lines.append(
                f"| {name} | {d_mac[0]:+.3f} / {d_mac[1]:+.3f} | {d1:+.1f} ({100 * p1:+.0f} %) | "
                f"{d16:+.1f} ({100 * p16:+.0f} %) | yes |"
            )
            prev = cur
        lines.append("")
    if ("share:never", 1) in med:
        names = ["share:never", *SHARE_SETS]
        lines += ["| box count | " + " | ".join(f"{k[6:]} ms/box (GMAC/box)" for k in names) + " |"]
        lines += ["|---" * (len(names) + 1) + "|"]
        for n in SHARE_CHECK:
            cells = [f"{med[(k, n)]['per_box_median_ms']:.1f} ({med[(k, n)]['gmac'] / n:.2f})" for k in names]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    sessions = [r for r in rows if r["backend"].startswith("session:")]
    if sessions and (new, 1) in med:
        base = med[(new, 1)]
        lines += ["| session option (N=1) | median ms | p95 | vs default |", "|---|---|---|---|"]
        lines.append(f"| {next(iter(SESSION_SETS))} | {base['median_ms']:.1f} | {base['p95_ms']:.1f} | 1.00x |")
        for r in sessions:
            lines.append(
                f"| {r['backend'][8:]} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
                f"{r['median_ms'] / base['median_ms']:.2f}x |"
            )
        lines.append("")
    for r in rows:
        if r["backend"] == "profile":
            ops = ", ".join(f"{k} {v:.1f}" for k, v in list(r["by_op_ms"].items())[:10])
            lines.append(f"Profile N={r['n_boxes']}: kernels {r['kernel_ms_per_run']:.1f} ms per run; {ops}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""``medsam-rt bench``: latency, cold start and memory of medsam-rt against PyTorch, in one run.

Every backend (medsam-rt per exported precision, PyTorch fp32) is measured in its own subprocess, so its peak
RSS and cold start are its own; backends alternate for ``rounds`` rounds so ratios survive a noisy machine.
Each measurement: warm-up, then ``repeats`` timed runs (median, p95, min). Rows that cannot run here (CUDA
without a GPU, PyTorch without torch) are skipped with the reason. Output: one JSON line per backend (every
config field, hardware fingerprint, library versions) and a markdown table.

The drag rows are what a user feels: :data:`DRAG_BOXES` successive boxes on one embedded image, each a few pixels
off the last (:func:`drag_boxes`: the same sequence for every backend), timed one box at a time (decoder + mask
at the original size: medsam-rt's crops, PyTorch's ``F.interpolate`` + threshold), p50 and p95 per image size.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from medsam_rt.core.images import atomic_write
from medsam_rt.tools.samples import ellipse_phantom

IMAGE_SIZES = (512, 2048)  # the interactive loop: box -> mask at the original resolution
DRAG_SIZES = (512, 2048, 4096)  # the drag: successive boxes on one embedded image
DRAG_BOXES = 30


def _stats(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "min_ms": float(ms.min())}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Warm-up once, then time ``repeats`` runs; returns the stats and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return _stats(times), out


def _boxes(n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, size * 0.5, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(size * 0.1, size * 0.45, (n, 2))], axis=1)


def drag_boxes(size: int, n: int = DRAG_BOXES) -> np.ndarray:
    """float64 ``(n, 4)``: a drag on a ``size`` x ``size`` image: a box around the phantom's object, then each box
    moves its corners a few pixels from the last (1-3 pixels per 512 of image size: the same motion on a screen
    showing the whole image). Deterministic: every backend gets the same sequence."""
    from medsam_rt.tools.samples import ellipse_phantom

    rng = np.random.default_rng(size)
    box = ellipse_phantom(size, size, seed=size).boxes[0].astype(np.float64)
    step = max(1, size // 512)
    out = [box]
    for _ in range(n - 1):
        box = np.clip(box + rng.integers(-3, 4, 4) * step, 0, size)
        box[2:] = np.maximum(box[2:], 8 * step)  # stays a box of at least 8 steps inside the image
        box[:2] = np.minimum(box[:2], box[2:] - 8 * step)
        out.append(box)
    return np.stack(out)


def drag(embed: Callable, segment: Callable, sizes: tuple[int, ...] = DRAG_SIZES) -> dict[str, list[float]]:
    """Per image size, the box -> mask times (ms) of :func:`drag_boxes` on one embedded phantom, one box per call
    (after one untimed box)."""
    from medsam_rt.tools.samples import ellipse_phantom

    out = {}
    for size in sizes:
        emb = embed(ellipse_phantom(size, size, seed=size).image)
        boxes = drag_boxes(size)
        segment(emb, boxes[:1])
        times = []
        for box in boxes:
            t0 = time.perf_counter()
            segment(emb, box[None])
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(size)] = times
    return out


def ort_backend(model_dir: Path, precision: str, device: str) -> tuple[Callable, Callable, dict]:
    """medsam-rt on a model directory: ``embed(image)``, ``segment(emb, boxes) -> Segmentation`` (its masks made:
    the crops at the original size), extra row fields."""
    from medsam_rt.core.model import MedSAM

    model = MedSAM.load(model_dir, device=device, precision=precision)
    g = model.manifest.raw["graphs"]
    size_mib = sum(g[r][model.precision]["bytes"] for r in ("encoder", "decoder")) / 2**20
    extra = {"graph_mib": size_mib, "execution": model.execution_report()}
    return model.embed, model.segment, extra


def optimum_backend(model_dir: Path, onnx_dir: Path, device: str) -> tuple[Callable, Callable, dict]:
    """optimum's export of the same model (``vision_encoder.onnx`` + ``prompt_encoder_mask_decoder.onnx``) on
    ONNX Runtime, with medsam-rt's pre/postprocessing: boxes go in as two corner points (labels 2, 3: SAM's box
    corner embeddings), the best of its three masks per box is upscaled."""
    from medsam_rt.core.manifest import load_manifest
    from medsam_rt.core.postprocess import chain
    from medsam_rt.core.preprocess import preprocess_image, scale_boxes, to_rgb_uint8
    from medsam_rt.core.providers import create_session

    p = load_manifest(model_dir).preprocessing
    encoder = create_session(str(onnx_dir / "vision_encoder.onnx"), device)
    decoder = create_session(str(onnx_dir / "prompt_encoder_mask_decoder.onnx"), device)

    def embed(image: np.ndarray) -> Any:
        rgb = to_rgb_uint8(image)
        pixels, resized = preprocess_image(rgb, p)
        emb, pos = encoder.run(["image_embeddings", "image_positional_embeddings"], {"pixel_values": pixels})
        return emb, pos, rgb.shape[:2], resized

    def segment(state: Any, boxes: np.ndarray) -> list:
        emb, pos, original, resized = state
        scaled = scale_boxes(boxes, original, resized, p)
        feeds = {
            "image_embeddings": emb,
            "image_positional_embeddings": pos,
            "input_points": scaled.reshape(1, -1, 2, 2).astype(np.float32),
            "input_labels": np.tile(np.array([2, 3], np.int64), (1, len(scaled), 1)),
        }
        iou, masks = decoder.run(["iou_scores", "pred_masks"], feeds)
        best = masks[0, np.arange(len(scaled)), iou[0].argmax(axis=1)]
        upscale = chain(p, resized, original, best.shape[1:])
        return [upscale.mask_crop(logits) for logits in best]

    size = sum((onnx_dir / f).stat().st_size for f in ("vision_encoder.onnx", "prompt_encoder_mask_decoder.onnx"))
    return embed, segment, {"graph_mib": size / 2**20}


def worker(
    model_dir: Path,
    backend: str,
    repeats: int,
    box_counts: tuple[int, ...],
    device: str,
    drag_sizes: tuple[int, ...] = DRAG_SIZES,
) -> dict[str, Any]:
    """Measure one backend in this (fresh) process."""
    t0 = time.perf_counter()
    if backend.startswith("pytorch"):
        from medsam_rt_export.bench import torch_backend  # the torch side lives in the export package

        # pytorch-fp32 (CPU), pytorch-cuda-fp32, pytorch-cuda-fp16
        embed, segment, extra = torch_backend(model_dir, "cuda" if "cuda" in backend else "cpu", backend[-4:])
    elif backend == "optimum-fp32":
        embed, segment, extra = optimum_backend(model_dir, optimum_dir(model_dir), device)
    else:
        embed, segment, extra = ort_backend(model_dir, backend.split("-", 1)[1], device)
    gpu_peak = extra.pop("gpu_peak", None) or (_process_gpu_mib if device == "cuda" else None)
    images = {s: ellipse_phantom(s, s, seed=s).image for s in IMAGE_SIZES}
    emb = embed(images[IMAGE_SIZES[0]])
    cold = time.perf_counter() - t0
    encoder, emb = timed(lambda: embed(images[IMAGE_SIZES[0]]), repeats)
    decoder = {}
    for n in box_counts:
        stats, _ = timed(lambda n=n: segment(emb, _boxes(n, IMAGE_SIZES[0])), repeats)
        decoder[str(n)] = {**stats, "per_box_ms": stats["median_ms"] / n}
    loop = {}
    for s, image in images.items():
        e = embed(image)
        loop[str(s)], _ = timed(lambda e=e, s=s: segment(e, _boxes(1, s)), repeats)
    drag_ms = drag(embed, segment, drag_sizes)
    return {
        "backend": backend,
        "cold_start_s": cold,
        "encoder": encoder,
        "decoder": decoder,
        "interactive_loop": loop,
        "drag_ms": drag_ms,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": gpu_peak() if gpu_peak else None,
        **extra,
    }


def _process_gpu_mib() -> float | None:
    """GPU memory this process holds now (nvidia-smi), for ONNX Runtime's CUDA rows; ``None`` if unknown."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return None


def fingerprint() -> dict[str, Any]:
    """CPU model, cores, GPU (when nvidia-smi answers), library versions."""
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = None
    try:
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for dist in ("medsam-rt", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": versions,
    }


def optimum_dir(model_dir: Path) -> Path:
    """Where optimum's export of the model behind ``model_dir`` is cached (keyed by the model checksum)."""
    from medsam_rt.core.manifest import load_manifest

    checksum = load_manifest(model_dir).raw["model"]["checksum"].split(":")[-1][:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsam-rt" / "optimum" / checksum


def _prepare_optimum(model_dir: Path, python: str | None, kind: str) -> str | None:
    """Export the optimum baseline with ``python`` unless cached; return why it cannot run, or ``None``."""
    if kind == "litemedsam":
        return "optimum-fp32: optimum exports transformers SamModel checkpoints; LiteMedSAM (TinyViT) is not one"
    target = optimum_dir(model_dir)
    if (target / "source.txt").is_file():
        return None
    if python is None:
        return (
            "optimum-fp32: no --optimum-python given (optimum-onnx 0.1 pins transformers < 4.58; "
            "'make bench' passes .venv-tf4/bin/python, which has it)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [python, "-m", "medsam_rt_export.optimum_baseline", str(model_dir), str(target)], capture_output=True, text=True
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"optimum-fp32: its export failed with {python}: {last}"
    return None


def plan(
    model_dir: Path, device: str, with_torch: bool, optimum_python: str | None = None
) -> tuple[list[str], list[str]]:
    """Backends to run here, and the skipped ones with their reason."""
    import onnxruntime as ort

    from medsam_rt.core.manifest import load_manifest

    manifest = load_manifest(model_dir)
    run, skipped = [], []
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        skipped.append(f"medsam-rt on CUDA: onnxruntime has no CUDAExecutionProvider here ({ort.get_device()})")
    for p in manifest.precisions:
        run.append(f"ort-{p}")
    if with_torch:
        try:
            from medsam_rt_export.bench import torch_cuda_available  # needs torch and the export extra

            run.insert(0, "pytorch-fp32")
            if device == "cuda" and torch_cuda_available():
                run[1:1] = ["pytorch-cuda-fp32", "pytorch-cuda-fp16"]
            elif device == "cuda":
                skipped.append("pytorch on CUDA: torch.cuda.is_available() is False")
        except ImportError as exc:
            skipped.append(f"pytorch-fp32: {exc}")
    why_not = _prepare_optimum(model_dir, optimum_python, manifest.raw["model"].get("kind", ""))
    if why_not is None:
        run.append("optimum-fp32")
    else:
        skipped.append(why_not)
    if not cuda:
        skipped.append("CUDA rows (medsam-rt fp16/fp32 on CUDA, PyTorch on CUDA): no GPU on this host")
    return run, skipped


def _row_device(backend: str, device: str) -> str:
    if backend.startswith("pytorch"):
        return "cuda" if "cuda" in backend else "cpu"
    return device


def run_bench(
    model_dir: Path,
    out_dir: Path,
    *,
    quick: bool = False,
    with_torch: bool = True,
    device: str = "cpu",
    optimum_python: str | None = None,
    print_fn: Callable[[str], None] = print,
    drag_sizes: tuple[int, ...] = DRAG_SIZES,
) -> list[dict[str, Any]]:
    """Run every backend in subprocesses, print the table, write JSON lines + markdown + plot; return the rows.
    ``drag_sizes``: the image sizes of the drag rows."""
    repeats, rounds = (3, 1) if quick else (5, 2)
    box_counts = (1, 4, 16) if quick else (1, 4, 16, 64)
    backends, skipped = plan(model_dir, device, with_torch, optimum_python)
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(rounds):
        for b in backends:
            cmd = [
                sys.executable,
                "-m",
                "medsam_rt.tools.bench",
                str(model_dir),
                b,
                str(repeats),
                ",".join(map(str, box_counts)),
                _row_device(b, device),
                ",".join(map(str, drag_sizes)),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"benchmark worker {b} failed: {r.stderr.strip().splitlines()[-1:]}")
            runs[b].append(json.loads(r.stdout.strip().splitlines()[-1]))
    manifest = json.loads((model_dir / "manifest.json").read_text())
    hw = fingerprint()
    rows = []
    for b, rs in runs.items():

        def med(get: Callable[[dict], float], rs: list[dict] = rs) -> float:
            return float(np.median([get(r) for r in rs]))

        rows.append(
            {
                "benchmark": "medsam-rt bench",
                "quick": quick,
                "model": manifest["model"]["source"],
                "random_weights": manifest["model"]["random_weights"],
                "backend": b,
                "device": _row_device(b, device),
                "repeats": repeats,
                "rounds": rounds,
                "image": IMAGE_SIZES[0],
                "encoder_ms": med(lambda r: r["encoder"]["median_ms"]),
                "encoder_p95_ms": max(r["encoder"]["p95_ms"] for r in rs),
                "decoder_ms": {n: med(lambda r, n=str(n): r["decoder"][n]["median_ms"]) for n in box_counts},
                "decoder_per_box_ms": {n: med(lambda r, n=str(n): r["decoder"][n]["per_box_ms"]) for n in box_counts},
                "interactive_ms": {
                    s: med(lambda r, s=str(s): r["interactive_loop"][s]["median_ms"]) for s in IMAGE_SIZES
                },
                "drag": {s: _drag_stats([t for r in rs for t in r["drag_ms"][str(s)]]) for s in drag_sizes},
                "cold_start_s": med(lambda r: r["cold_start_s"]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                "peak_gpu_mib": max((r["peak_gpu_mib"] for r in rs if r.get("peak_gpu_mib")), default=None),
                "graph_mib": rs[0]["graph_mib"],
                "execution": rs[0].get("execution"),
                "hardware": hw,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    table = format_table(rows, skipped, hw)
    print_fn(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{Path(str(rows[0]['model'])).name.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(out_dir / f"{stem}.jsonl", lambda tmp: Path(tmp).write_text(jsonl))
    atomic_write(out_dir / f"{stem}.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    why_not = write_plot(rows, out_dir / f"{stem}.png")
    print_fn(f"wrote {out_dir / stem}.jsonl, .md" + (f" (no plot: {why_not})" if why_not else " and .png"))
    return rows


def _drag_stats(ms: list[float]) -> dict[str, float]:
    """p50 and p95 of the drag's box -> mask times pooled over the rounds (``boxes``: how many)."""
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "boxes": len(ms)}


def write_plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    """PNG: encoder latency per backend (bars) and decoder latency per box against N (lines); needs matplotlib
    (the ``bench`` extra). Returns why it could not plot, or ``None`` when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install 'medsam-rt[bench]'"
    r0 = rows[0]
    fig, (ax_enc, ax_dec) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["backend"] for r in rows]
    ax_enc.bar(names, [r["encoder_ms"] for r in rows], color="#4a7ebb")
    ax_enc.set_ylabel("encoder latency, median ms")
    ax_enc.set_title("image encoder (once per image)")
    ax_enc.tick_params(axis="x", rotation=20)
    for r in rows:
        counts = list(r["decoder_per_box_ms"])
        ax_dec.plot(counts, [r["decoder_per_box_ms"][n] for n in counts], marker="o", label=r["backend"])
    ax_dec.set_xscale("log", base=2)
    ax_dec.set_xlabel("boxes per decoder call (N)")
    ax_dec.set_ylabel("decoder latency per box, median ms")
    ax_dec.set_title("prompt encoder + mask decoder")
    ax_dec.legend()
    weights = "random weights" if r0["random_weights"] else "trained weights"
    hw = r0["hardware"]
    fig.suptitle(
        f"{r0['model']} ({weights}) on {hw['cpu']}, {hw['cores']} cores{', ' + hw['gpu'] if hw['gpu'] else ''}"
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return None


def format_table(rows: list[dict[str, Any]], skipped: list[str], hw: dict[str, Any]) -> str:
    """Markdown: one row per backend; "vs PyTorch" divides by PyTorch fp32 eager on the row's device."""
    baseline = {r.get("device", "cpu"): r for r in rows if r["backend"] in ("pytorch-fp32", "pytorch-cuda-fp32")}
    gpu = any(r.get("peak_gpu_mib") for r in rows)
    counts = list(rows[0]["decoder_ms"])
    r0 = rows[0]
    head = (
        f"{r0['model']} ({'random weights' if r0['random_weights'] else 'trained weights'}); {hw['cpu']}, "
        f"{hw['cores']} cores{', ' + hw['gpu'] if hw['gpu'] else ''}; medians of {r0['rounds']}x{r0['repeats']}"
    )
    lines = [
        head,
        "",
        "| backend | device | encoder ms | vs PyTorch | "
        + " | ".join(f"decoder ms/box N={n}" for n in counts)
        + " | "
        + " | ".join(f"box→mask {s}² ms" for s in IMAGE_SIZES)
        + " | cold start s | peak RSS MiB | "
        + ("peak GPU MiB | " if gpu else "")
        + "MiB |",
        "|" + "---|" * (7 + len(counts) + len(IMAGE_SIZES) + gpu),
    ]
    for r in rows:
        base = baseline.get(r.get("device", "cpu"))
        ratio = f"{r['encoder_ms'] / base['encoder_ms']:.2f}×" if base else "–"
        gpu_cell = (f"{r['peak_gpu_mib']:.0f} | " if r.get("peak_gpu_mib") else "– | ") if gpu else ""
        lines.append(
            f"| {r['backend']} | {r.get('device', 'cpu')} | {r['encoder_ms']:.0f} | {ratio} | "
            + " | ".join(f"{r['decoder_per_box_ms'][n]:.1f}" for n in counts)
            + " | "
            + " | ".join(f"{r['interactive_ms'][s]:.1f}" for s in IMAGE_SIZES)
            + f" | {r['cold_start_s']:.2f} | {r['peak_rss_mib']:.0f} | {gpu_cell}"
            + ("–" if r["graph_mib"] is None else f"{r['graph_mib']:.0f}")
            + " |"
        )
    lines += ["", *format_drag_table(rows, baseline)]
    lines += [f"\nskipped: {reason}" for reason in skipped]
    return "\n".join(lines)


def format_drag_table(rows: list[dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: the drag rows (p50 / p95 box -> mask ms per image size, p50 against PyTorch's)."""
    rows = [r for r in rows if r.get("drag")]
    if not rows:
        return []
    sizes = list(rows[0]["drag"])
    n = rows[0]["drag"][sizes[0]]["boxes"]
    lines = [
        f"drag: {n} successive boxes on one embedded image, one box per call (decoder + mask at the original size)",
        "",
        "| backend | device | " + " | ".join(f"{s}² p50 / p95 ms | vs PyTorch" for s in sizes) + " |",
        "|" + "---|" * (2 + 2 * len(sizes)),
    ]
    for r in rows:
        base = baseline.get(r.get("device", "cpu"))
        cells = []
        for s in sizes:
            d = r["drag"][s]
            ratio = f"{d['p50_ms'] / base['drag'][s]['p50_ms']:.2f}×" if base and base.get("drag") else "–"
            cells.append(f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f} | {ratio}")
        lines.append(f"| {r['backend']} | {r.get('device', 'cpu')} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":  # worker entry: python -m medsam_rt.tools.bench MODEL_DIR BACKEND REPEATS COUNTS DEVICE DRAG
    _dir, _backend, _repeats, _counts, _device, _drag = sys.argv[1:7]
    result = worker(
        Path(_dir),
        _backend,
        int(_repeats),
        tuple(int(n) for n in _counts.split(",")),
        _device,
        tuple(int(n) for n in _drag.split(",")),
    )
    print(json.dumps(result))

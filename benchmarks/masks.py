"""Masks from low-res logits: what the exact O(boundary) crops cost against the float32 dense path they replace,
and how often the two differ.

    python benchmarks/masks.py [MODEL_DIR] [--sizes 512,2048,4096,10000] [--repeats 5] [--out benchmarks/results]

Logits: the model's decoder on an ellipse phantom of each size (the box around its object), or, without a model
directory, smooth synthetic blobs. Per recipe (the model's, or ``crop_resize`` and ``upscale_crop_resize`` for
synthetic logits) and image size: the mask step alone (low-res logits -> mask at the original size), median CPU
time of ``--repeats`` runs (``time.process_time``: this process's CPU, so a busy machine inflates it less than
wall time), for the exact crops (:meth:`UpscaleChain.mask_crop`), the crops made dense (``+ dense``: what
``Segmentation.masks`` adds) and the float32 BLAS path (``rows @ logits @ cols.T > t``, single-threaded for a
like-for-like CPU time; what medsam-rt did before and what the device graph does); the crop's size; and the
pixels where the float32 path's mask differs from the exact one (with the largest ``|exact logit - t|`` among
them: each lies within float32 rounding of the threshold). One JSON line per measurement and a markdown table.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads its BLAS
    os.environ.setdefault(_var, "1")  # one thread, as the crops: CPU times compare like for like

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from medsam_rt.core.images import atomic_write  # noqa: E402
from medsam_rt.core.postprocess import axis_matrix, chain  # noqa: E402
from medsam_rt.core.preprocess import Preprocessing, resized_shape  # noqa: E402
from medsam_rt.tools.bench import fingerprint  # noqa: E402

SYNTHETIC = {
    "crop_resize": dict(resize="longest_side", size=256, pad_size=(256, 256), postprocess="crop_resize"),
    "upscale_crop_resize": dict(
        resize="longest_side", size=1024, pad_size=(1024, 1024), postprocess="upscale_crop_resize"
    ),
}


def _cpu_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times) * 1e3)


def _synthetic_logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:256, :256].astype(np.float64)
    cy, cx = rng.uniform(90, 160, 2)
    v = 0.3 * (60 - np.hypot((y - cy) * 1.3, x - cx)) + 0.2 * np.sin(x / 3.0)
    return v.astype(np.float32)


def cases(model_dir: Path | None, sizes: list[int]):
    """``(recipe, Preprocessing, size, low-res logits)`` per case."""
    if model_dir is None:
        for name, fields in SYNTHETIC.items():
            p = Preprocessing(interpolation="bilinear", normalize="rescale_mean_std", **fields)
            for size in sizes:
                yield name, p, size, _synthetic_logits(size)
        return
    from medsam_rt import MedSAM
    from medsam_rt.tools.samples import ellipse_phantom

    model = MedSAM.load(model_dir, precision="fp32")
    for size in sizes:
        ph = ellipse_phantom(size, size, seed=size)
        res = model.segment(model.embed(ph.image), ph.boxes[:1])
        yield model.preprocessing.postprocess, model.preprocessing, size, res.low_res_logits[0]


def measure(recipe: str, p: Preprocessing, size: int, low: np.ndarray, repeats: int) -> dict:
    original = (size, size)
    resized = resized_shape(original, p)
    ch = chain(p, resized, original, low.shape)
    t = float(p.mask_threshold)
    rows = axis_matrix(p.postprocess, low.shape[0], p.pad_size[0], resized[0], original[0])
    cols = axis_matrix(p.postprocess, low.shape[1], p.pad_size[1], resized[1], original[1])
    crop = ch.mask_crop(low)
    row = {
        "benchmark": "masks",
        "recipe": recipe,
        "size": size,
        "crop": list(crop.shape),
        "crop_fraction": crop.mask.size / (size * size),
        "exact_crop_ms": _cpu_ms(lambda: ch.mask_crop(low), repeats),
        "exact_crop_dense_ms": _cpu_ms(lambda: ch.mask_crop(low).dense(original), repeats),
    }
    if size * size <= 4096 * 4096:  # the float32 dense path needs H * W * 4 bytes per box, and time
        row["float32_dense_ms"] = _cpu_ms(lambda: (rows @ low) @ cols.T > t, max(1, repeats // 2))
        exact = ch.dense(np.asarray(low, np.float64) - t)
        differ = ((rows @ low) @ cols.T > t) != crop.dense(original)
        row["differ_px"] = int(differ.sum())
        row["differ_fraction"] = float(differ.mean())
        row["differ_max_abs_logit"] = float(np.abs(exact[differ]).max()) if differ.any() else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, nargs="?", help="a model directory (default: synthetic logits)")
    ap.add_argument("--sizes", default="512,2048,4096,10000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    hw = fingerprint()
    rows = []
    for recipe, p, size, low in cases(args.model_dir, [int(s) for s in args.sizes.split(",")]):
        row = {**measure(recipe, p, size, low, args.repeats), "model": str(args.model_dir or "synthetic")}
        rows.append({**row, "hardware": hw, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(json.dumps(row), flush=True)
    lines = [
        f"{rows[0]['model']}; {hw['cpu']}, {hw['cores']} cores; CPU ms, median of {args.repeats}",
        "",
        "| recipe | size | crop | exact crop ms | + dense ms | float32 dense ms | differing px (fraction, max abs "
        "logit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = f"{r['float32_dense_ms']:.1f}" if "float32_dense_ms" in r else "–"
        differ = (
            f"{r['differ_px']} ({r['differ_fraction']:.1e}, {r['differ_max_abs_logit'] or 0:.1e})"
            if "differ_px" in r
            else "–"
        )
        lines.append(
            f"| {r['recipe']} | {r['size']}² | {r['crop'][0]}x{r['crop'][1]} | {r['exact_crop_ms']:.2f} | "
            f"{r['exact_crop_dense_ms']:.2f} | {dense} | {differ} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"masks-{time.strftime('%Y%m%d-%H%M%S')}"
    atomic_write(f"{stem}.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    atomic_write(f"{stem}.md", lambda tmp: Path(tmp).write_text(table + "\n"))


if __name__ == "__main__":
    main()

"""The same graphs on another CPU class: this machine's kernels vs an emulated AVX2-only CPU, one image.

    python benchmarks/cross_cpu.py MODEL_DIR [ENCODER.onnx ...] [--cpu Haswell] [--out benchmarks/results]

Runs each encoder graph (default: the directory's int8 and fp32 encoders) on one validation image natively and
under ``qemu-x86_64 -cpu Haswell`` (Debian's qemu-user: AVX2, FMA, F16C, no AVX-512, no VNNI — the kernels of an
AMD Zen 2 or a pre-Ice-Lake Intel CPU), then decodes both embeddings natively with the fp32 decoder and compares:
relative L2 difference of the embeddings, max low-res logit difference, mask Dice and IoU-score difference. The
emulation is slow (minutes per encode); the probe line shows that it really selects the saturating u8·s8
kernels. One JSON line per graph + a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_WORKER = """
import sys, json, numpy as np
sys.path.insert(0, {repo!r})
from medsam_rt.core.cpu import cpu_class, int8_probe
from medsam_rt.core.preprocess import preprocess_image, to_rgb_uint8, Preprocessing
from medsam_rt.core.providers import create_session
p = Preprocessing.from_dict(json.loads({recipe!r}))
image = np.load({image!r})
pixels, _ = preprocess_image(to_rgb_uint8(image), p)
for path, out in json.loads({jobs!r}):
    (emb,) = create_session(path, "cpu", memory_pattern=False).run(None, {{"pixel_values": pixels}})
    np.save(out, emb)
print(json.dumps({{"cpu_class": cpu_class(), "probe": int8_probe()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("encoders", nargs="*", type=Path)
    ap.add_argument("--cpu", default="Haswell", help="qemu CPU model (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=9, help="index into the validation set (default: anatomical.nii)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("cross_cpu.py: qemu-x86_64 not found (apt-get install qemu-user)")
    from medsam_rt.core.cpu import cpu_info
    from medsam_rt.core.model import MedSAM
    from medsam_rt.core.preprocess import Preprocessing
    from medsam_rt.tools.samples import dice, validation_set

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    encoders = args.encoders or [args.model_dir / manifest["graphs"]["encoder"][p]["file"] for p in ("int8", "fp32")]
    sample = validation_set()[args.sample]
    tmp = Path(tempfile.mkdtemp(prefix="cross-cpu-"))
    np.save(tmp / "image.npy", sample.image)
    results = {}
    for where, prefix in (("native", []), (f"qemu -cpu {args.cpu}", [qemu, "-cpu", args.cpu])):
        jobs = [[str(e), str(tmp / f"{where.split()[0]}-{i}.npy")] for i, e in enumerate(encoders)]
        script = _WORKER.format(
            repo=str(Path(__file__).resolve().parents[1]),
            recipe=json.dumps(manifest["preprocessing"]),
            image=str(tmp / "image.npy"),
            jobs=json.dumps(jobs),
        )
        start = time.perf_counter()
        out = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        results[where] = {"seconds": time.perf_counter() - start, **info, "embeddings": [j[1] for j in jobs]}
        print(f"{where}: {info['cpu_class']} in {results[where]['seconds']:.0f} s", file=sys.stderr)
    p = Preprocessing.from_dict(manifest["preprocessing"])
    decoder = args.model_dir / manifest["graphs"]["decoder"]["fp32"]["file"]
    model = MedSAM(p, encoders[0], decoder, model_id="cross-cpu")
    native, emulated = results["native"], results[f"qemu -cpu {args.cpu}"]
    rows = []
    for i, enc in enumerate(encoders):
        a, b = np.load(native["embeddings"][i]), np.load(emulated["embeddings"][i])
        base = model.embed(sample.image)  # sizes and model identity; the values come from each run
        segs = [model.segment(dataclasses.replace(base, embeddings=emb), sample.boxes) for emb in (a, b)]
        rows.append(
            {
                "graph": enc.name,
                "sample": sample.name,
                "embedding_rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                "max_logit_diff": float(np.abs(segs[0].low_res_logits - segs[1].low_res_logits).max()),
                "min_dice": min(dice(x, y) for x, y in zip(segs[0].masks, segs[1].masks, strict=True)),
                "iou_diff": float(np.abs(segs[0].scores - segs[1].scores).max()),
                "native": {"cpu": cpu_info()["cpu"], "cpu_class": native["cpu_class"]},
                "emulated": {"cpu": args.cpu, "cpu_class": emulated["cpu_class"], "probe": emulated["probe"]},
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(args.out / f"cross-cpu-{stamp}.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    lines = [
        f"{native['cpu_class']} (native) vs {emulated['cpu_class']} (qemu -cpu {args.cpu}), {sample.name}",
        "",
        "| graph | embedding rel. L2 diff | max low-res logit diff | min mask Dice | IoU-score diff |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['embedding_rel_l2']:.2e} | {r['max_logit_diff']:.2e} | {r['min_dice']:.4f} "
            f"| {r['iou_diff']:.2e} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / f"cross-cpu-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

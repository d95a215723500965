"""Parity checks: ONNX Runtime vs PyTorch on inputs other than the tracing ones; raise with numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from medsam_rt.cpu import cpu_info
from medsam_rt.errors import GateError, ParityError
from medsam_rt.preprocess import Preprocessing, preprocess_image

from .sources import Reference

FP32_TOLERANCE = 1e-3
CHECK_BOX_COUNTS = (1, 3)  # the decoder is traced with N=2


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
    """Encoder inputs for parity: a preprocessed random-noise image (odd aspect ratio) and standard-normal pixels."""
    rng = np.random.default_rng(seed)
    p = Preprocessing.from_dict(preprocessing)
    img = rng.integers(0, 256, (301, 457, 3), dtype=np.uint8)
    pixels, _ = preprocess_image(img, p)
    normal = rng.standard_normal((1, 3, *p.pad_size)).astype(np.float32)
    return [("noise image 301x457", pixels), ("standard normal", normal)]


def check_parity(
    reference: Reference,
    encoder_path: str,
    decoder_path: str,
    preprocessing: dict[str, Any],
    tol: float = FP32_TOLERANCE,
) -> list[dict[str, Any]]:
    """Run the exported graphs on ONNX Runtime (CPU) against the PyTorch ``reference`` and return the report.

    Checks, each at ``tol`` max abs diff: encoder embeddings; decoder logits and
    IoU on PyTorch's embedding for N in :data:`CHECK_BOX_COUNTS`; and the model's
    own end-to-end forward against encoder -> decoder on ONNX Runtime.

    Raises:
        ParityError: on the first output beyond tolerance (nothing should be written).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(encoder_path, opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(decoder_path, opts, providers=["CPUExecutionProvider"])
    size = Preprocessing.from_dict(preprocessing).pad_size[0]
    rng = np.random.default_rng(1)
    report: list[dict[str, Any]] = []
    for i, (case, pixels) in enumerate(sample_inputs(preprocessing)):
        with torch.no_grad():
            ref_emb = reference.encode(torch.from_numpy(pixels))
        (got_emb,) = enc.run(["image_embeddings"], {"pixel_values": pixels})
        report.append(compare("encoder", "image_embeddings", case, ref_emb.numpy(), got_emb, tol))
        for n in CHECK_BOX_COUNTS:
            boxes = _random_boxes(rng, n, size)
            with torch.no_grad():
                ref_logits, ref_iou = reference.decode(ref_emb, torch.from_numpy(boxes))
            logits, iou = dec.run(None, {"image_embeddings": ref_emb.numpy(), "boxes": boxes})
            c = f"{case}, N={n}"
            report.append(compare("decoder", "low_res_logits", c, ref_logits.numpy(), logits, tol))
            report.append(compare("decoder", "iou_scores", c, ref_iou.numpy(), iou, tol))
            if i == 0 and n == CHECK_BOX_COUNTS[-1]:
                with torch.no_grad():
                    full = reference.full(torch.from_numpy(pixels), torch.from_numpy(boxes))
                e2e, _ = dec.run(None, {"image_embeddings": got_emb, "boxes": boxes})
                report.append(compare("encoder+decoder", "low_res_logits", f"end to end, {c}", full.numpy(), e2e, tol))
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


def check_variant(
    precision: str,
    preprocessing: dict[str, Any],
    fp32: dict[str, Path],
    variant: dict[str, Path],
    gate_dice: bool,
    fp32_results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A precision variant's gate, run through the runtime's own pipeline on ONNX Runtime's CPU provider.

    1. No NaN/Inf in embeddings, logits or scores on :func:`extreme_inputs`.
    2. On the validation set (phantoms, plus the shipped medical images when their packages are installed):
       per box, mask Dice vs the fp32 graphs >= :data:`DICE_MIN` and IoU-score difference <= :data:`IOU_MAX_DIFF`
       (enforced when ``gate_dice``; random-weight models only report them).

    ``fp32_results`` (sample name -> fp32 ``Segmentation``) carries the fp32 predictions from one variant's gate
    to the next, so an export with several variants runs the fp32 graphs over the validation set once.

    Raises:
        GateError: a check fails (the export writes nothing).
    """
    from medsam_rt.model import MedSAM
    from medsam_rt.samples import dice, validation_set

    p = Preprocessing.from_dict(preprocessing)
    var = MedSAM(p, variant["encoder"], variant["decoder"], precision=precision, model_id=f"gate-{precision}")
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
    # real weights: the whole validation set; random weights (nothing to gate): the first phantoms
    samples = validation_set() if gate_dice else validation_set()[:RANDOM_WEIGHT_SAMPLES]
    dices, iou_diffs, logit_diffs, boxes, per_sample = [], [], [], 0, []
    worst = ("", 1.0)
    fp32_results = {} if fp32_results is None else fp32_results
    ref = None  # the fp32 sessions, created only if some prediction is not cached yet
    for sample in samples:
        if sample.name not in fp32_results:
            ref = ref or MedSAM(p, fp32["encoder"], fp32["decoder"], model_id="gate-fp32")
            fp32_results[sample.name] = ref.predict(sample.image, sample.boxes)
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
        "ran_on": cpu_info(),
    }
    if gate_dice and report["min_dice"] < DICE_MIN[precision]:
        raise GateError(precision, "mask Dice vs fp32", report["min_dice"], f">= {DICE_MIN[precision]}", worst[0])
    if gate_dice and report["max_iou_diff"] > IOU_MAX_DIFF:
        raise GateError(precision, "IoU-score diff vs fp32", report["max_iou_diff"], f"<= {IOU_MAX_DIFF}", "")
    report["passed"] = True
    return report

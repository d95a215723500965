"""Parity checks: ONNX Runtime vs PyTorch on inputs other than the tracing ones; raise with numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from medsam_rt.errors import ParityError
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

"""The PyTorch rows of ``medsam-rt bench``: the fp32 model behind an export, run the way medsam-rt runs it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsam_rt.core.preprocess import Preprocessing, preprocess_image, scale_boxes, to_rgb_uint8

from .source import Source
from .sources import load_source


def torch_cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def source_of(model_dir: Path) -> tuple[Source, dict[str, Any]]:
    """The torch model a model directory was exported from (rebuilt from its manifest), and the manifest."""
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    info = manifest["model"]
    random = info["kind"] == "random"
    source = load_source("" if random else info["source"], random_weights=random, arch=info.get("arch", "vit-base"))
    return source, manifest


def upscale(logits: torch.Tensor, p: Preprocessing, resized: tuple[int, int], original: tuple[int, int]) -> Any:
    """The recipe's postprocessing in torch (``[N, 1, L, L]`` -> ``[N, 1, H, W]``), as the reference scripts do it:
    ``F.interpolate`` (bilinear, ``align_corners=False``) and crops."""
    (rh, rw), size = resized, tuple(original)
    if p.postprocess == "upscale_crop_resize":  # transformers' post_process_masks
        logits = F.interpolate(logits, size=tuple(p.pad_size), mode="bilinear", align_corners=False)[..., :rh, :rw]
    elif p.postprocess == "crop_resize":  # LiteMedSAM's CVPR24 script
        logits = logits[..., :rh, :rw]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def torch_backend(model_dir: Path, device: str = "cpu", dtype: str = "fp32") -> tuple[Callable, Callable, dict]:
    """The PyTorch model behind the export (eager, as the seed runs it) with the same preprocessing and a torch
    postprocessing; on CUDA in fp32 or fp16, synchronised so that timings are whole."""
    source, manifest = source_of(model_dir)
    p = Preprocessing.from_dict(manifest["preprocessing"])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dev = torch.device(device)
    float_type = torch.float16 if dtype == "fp16" else torch.float32
    if device != "cpu" or dtype != "fp32":
        source.model.to(dev, float_type)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def embed(image: np.ndarray) -> Any:
        pixels, resized = preprocess_image(to_rgb_uint8(image), p)
        emb = source.reference.encode(torch.from_numpy(pixels).to(dev, float_type))
        sync()
        return emb, image.shape[:2], resized

    @torch.no_grad()
    def segment(emb: Any, boxes: np.ndarray) -> Any:
        embedding, original, resized = emb
        scaled = torch.from_numpy(scale_boxes(boxes, original, resized, p)).to(dev, float_type)
        logits, _ = source.reference.decode(embedding, scaled)
        return (upscale(logits.float(), p, resized, original) > p.mask_threshold).cpu().numpy()

    extra: dict[str, Any] = {"graph_mib": None}
    if dev.type == "cuda":
        extra["gpu_peak"] = lambda: torch.cuda.max_memory_allocated() / 2**20
    return embed, segment, extra

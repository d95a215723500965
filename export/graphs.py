"""The two exported graphs: wrapper modules with a fixed, box-native I/O contract, and their ONNX export."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medsam_rt.errors import ExportError

from .util import one_line

if TYPE_CHECKING:
    from transformers import SamModel

ENCODER_INPUTS = {"pixel_values": "float32 [1, 3, S, S]: preprocessed image, S = encoder input size (pad_size)"}
ENCODER_OUTPUTS = {"image_embeddings": "float32 [1, C, 64, 64]: image embedding (C = 256 for MedSAM)"}
DECODER_INPUTS = {
    "image_embeddings": "float32 [1, C, 64, 64]: the encoder's output",
    "boxes": "float32 [N, 4]: x0, y0, x1, y1 in the encoder-input frame (pixels of the resized image), N >= 1",
}
DECODER_OUTPUTS = {
    "low_res_logits": "float32 [N, 1, 256, 256]: mask logits over the padded encoder input (single-mask output)",
    "iou_scores": "float32 [N, 1]: predicted IoU of each mask",
}


class EncoderGraph(nn.Module):
    """``pixel_values [1,3,S,S] -> image_embeddings [1,C,64,64]``."""

    def __init__(self, sam: SamModel) -> None:
        super().__init__()
        self.vision_encoder = sam.vision_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(pixel_values).last_hidden_state


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for N boxes on one image, single-mask output (MedSAM's ``multimask_output=False``).

    The library's own modules as one graph: what ``medsam-rt export`` wrote before
    :class:`~.fast_decoder.FastBoxDecoder` (kept as the baseline for benchmarks and tests).

    ``image_embeddings [1,C,64,64], boxes [N,4] -> low_res_logits [N,1,256,256], iou_scores [N,1]``.
    The image-wide positional embedding does not depend on the input, so it is
    computed here once and stored in the graph as a constant.
    """

    def __init__(self, sam: SamModel) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.get_image_wide_positional_embeddings().detach().clone())

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(
            input_points=None, input_labels=None, input_boxes=boxes[None], input_masks=None
        )
        out = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks, iou = out[0], out[1]
        return masks[0], iou[0]


def segment_anything_decode(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    boxes: torch.Tensor,
    image_pe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-anything-style prompt encoder + mask decoder for ``boxes [N,4]``, single-mask output.

    ``image_pe`` defaults to ``prompt_encoder.get_dense_pe()``. Returns ``[N,1,256,256]`` logits, ``[N,1]`` IoU.
    """
    sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
    return mask_decoder(
        image_embeddings=image_embeddings,
        image_pe=prompt_encoder.get_dense_pe() if image_pe is None else image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


class SegmentAnythingDecoderGraph(nn.Module):
    """The same decoder contract for segment-anything-style modules (``PromptEncoder`` + ``MaskDecoder``,
    as LiteMedSAM uses): ``image_embeddings [1,C,64,64], boxes [N,4] -> [N,1,256,256], [N,1]``. The library's
    modules as one graph, like :class:`DecoderGraph` (a baseline; exports use ``FastBoxDecoder``)."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        with torch.no_grad():
            self.register_buffer("dense_pe", prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return segment_anything_decode(self.prompt_encoder, self.mask_decoder, image_embeddings, boxes, self.dense_pe)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any] | None,
    opset: int,
) -> None:
    """Export ``module`` with torch's ONNX (dynamo) exporter into one self-contained file."""
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        torch_logger.setLevel(level)


#: The decoder is traced with these two boxes (in a 256-pixel frame, scaled to the encoder input size).
DECODER_TRACE_BOXES = ((10.0, 20.0, 100.0, 140.0), (50.0, 60.0, 200.0, 220.0))


def export_decoder_graph(module: nn.Module, path: Path, embed_channels: int, input_size: int, opset: int) -> None:
    """Export a decoder module with the contract's I/O (:data:`DECODER_INPUTS`, :data:`DECODER_OUTPUTS`) and a
    dynamic box count ``num_boxes`` (1..4096), traced with :data:`DECODER_TRACE_BOXES`."""
    n_boxes = torch.export.Dim("num_boxes", min=1, max=4096)
    boxes = torch.tensor(DECODER_TRACE_BOXES) * (input_size / 256)
    export_graph(
        module,
        (torch.zeros(1, embed_channels, 64, 64), boxes),
        path,
        list(DECODER_INPUTS),
        list(DECODER_OUTPUTS),
        {"image_embeddings": None, "boxes": {0: n_boxes}},
        opset,
    )

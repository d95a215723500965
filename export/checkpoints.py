"""The segment-anything checkpoint family: original MedSAM checkpoints (``medsam_vit_b.pth``, a segment-anything
state dict) -> transformers ``SamModel``, exported with MedSAM's original recipe
(:data:`MEDSAM_ORIGINAL_PREPROCESSING`).

The architecture is read off the tensors' shapes (embedding width, depth, heads from the relative-position
tables, which blocks attend globally, window size); the mask decoder's 8 attention heads are SAM's constant
(head counts leave no trace in the weights). Keys are renamed by the rules below and loaded strictly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import SamConfig, SamModel

from medsam_rt.errors import ExportError

from .hf import hf_model_source
from .source import Source
from .statedict import load_into, load_state_dict
from .util import sha256_file

#: MedSAM's original inference recipe (MedSAM_Inference.py), in the manifest vocabulary.
MEDSAM_ORIGINAL_PREPROCESSING: dict[str, Any] = {
    "recipe": "medsam-original",
    "resize": "square",
    "size": 1024,
    "interpolation": "bicubic",
    "normalize": "minmax",
    "pad_size": [1024, 1024],
    "box_scale": "per_axis",
    "box_round": "none",
    "postprocess": "resize",
    "mask_threshold": 0.0,
}
DECODER_HEADS = 8
#: File suffixes that name this family's checkpoints on ``--model``.
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# (pattern, replacement), applied in order to every segment-anything key
_RENAMES: list[tuple[str, str]] = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^vision_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$")


def _mlp_depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in state:
        m = _MLP.match(key)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def convert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a segment-anything ``Sam`` state dict to transformers ``SamModel`` keys."""
    depths = _mlp_depths(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        m = _MLP.match(key)
        if m:  # SAM MLP layers.0 / layers.i / layers.last -> proj_in / layers.(i-1) / proj_out
            prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
            name = "proj_in" if i == 0 else "proj_out" if i == depths[prefix] - 1 else f"layers.{i - 1}"
            new = f"{prefix}.{name}.{rest}"
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    if "shared_image_embedding.positional_embedding" in out:  # tied in SamModel
        out["prompt_encoder.shared_embedding.positional_embedding"] = out["shared_image_embedding.positional_embedding"]
    return out


def infer_config(state: dict[str, torch.Tensor]) -> SamConfig:
    """A ``SamConfig`` matching a segment-anything state dict's tensor shapes."""
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]
        hidden, patch_size = patch.shape[0], patch.shape[2]
        grid = state["image_encoder.pos_embed"].shape[1]
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")})
        rel = [state[f"image_encoder.blocks.{b}.attn.rel_pos_h"] for b in blocks]
        head_dim = rel[0].shape[1]
        global_blocks = [b for b, r in zip(blocks, rel, strict=True) if r.shape[0] == 2 * grid - 1]
        windows = {(r.shape[0] + 1) // 2 for r in rel if r.shape[0] != 2 * grid - 1}
        dec_hidden = state["mask_decoder.iou_token.weight"].shape[1]
        dec_layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers.")})
        cross = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
        iou_depth = _mlp_depths(state)["mask_decoder.iou_prediction_head"]
        vision = dict(
            hidden_size=hidden,
            patch_size=patch_size,
            image_size=grid * patch_size,
            num_hidden_layers=len(blocks),
            num_attention_heads=hidden // head_dim,
            mlp_dim=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
            output_channels=state["image_encoder.neck.0.weight"].shape[0],
            global_attn_indexes=global_blocks,
            window_size=windows.pop() if windows else 14,
            num_pos_feats=state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1],
        )
        prompt = dict(
            hidden_size=dec_hidden,
            image_size=grid * patch_size,
            patch_size=patch_size,
            mask_input_channels=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        )
        decoder = dict(
            hidden_size=dec_hidden,
            mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_hidden_layers=len(dec_layers),
            num_attention_heads=DECODER_HEADS,
            attention_downsample_rate=dec_hidden // cross,
            num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=iou_depth,
            iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise ExportError(
            f"not a segment-anything (MedSAM) checkpoint: cannot find {exc} among its {len(state)} tensors"
        ) from None
    if windows:
        raise ExportError(f"checkpoint mixes window sizes {sorted(windows)}; SAM uses one")
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    config._attn_implementation = "eager"
    return config


def original_checkpoint_source(path: Path) -> Source:
    """Load an original MedSAM/SAM checkpoint file into a ``SamModel`` with MedSAM's original preprocessing."""
    state = load_state_dict(path)
    config = infer_config(state)
    sam = SamModel(config).eval()
    load_into(sam, convert_keys(state), f"checkpoint {path}")
    preprocessing = dict(
        MEDSAM_ORIGINAL_PREPROCESSING,
        size=config.vision_config.image_size,
        pad_size=[config.vision_config.image_size] * 2,
    )
    vision = config.vision_config
    return hf_model_source(
        sam,
        preprocessing,
        {
            "source": str(path.resolve()),
            "kind": "segment_anything_checkpoint",
            "arch": f"sam-vit hidden={vision.hidden_size} layers={vision.num_hidden_layers}",
            "checksum": f"sha256:{sha256_file(path)}",
            "random_weights": False,
        },
    )

"""Graph optimisation and precision variants: fusions, fp16 conversion, int8 dynamic quantisation.

Every function here writes a new graph and returns a report for the manifest; the parity gate
(:mod:`.parity`) decides whether the result may ship.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

#: Ops kept in fp32 inside fp16 graphs. Measured on LiteMedSAM (validation set, against fp32): Softmax in fp16
#: gives max low-res logit error 0.266 and min Dice 0.99932, Softmax kept fp32 0.260 and 0.99928 — a wash there;
#: kept fp32 as insurance for ViT-B's global attention (4096 keys, relative-position terms added to the scores),
#: where real weights could not be measured here. Decomposed LayerNorms, the classic fp16 overflow, no longer
#: exist (see :func:`export_friendly`).
FP16_KEEP_FP32 = ("Softmax",)


def _is_channels_first_layernorm(module: nn.Module) -> bool:
    name = type(module).__name__
    if name == "SamLayerNorm":
        return getattr(module, "data_format", "") == "channels_first"
    return name == "LayerNorm2d"  # segment-anything / TinyViT necks and upscaling


def _channels_last_forward(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), module.weight, module.bias, module.eps)
        return y.permute(0, 3, 1, 2)

    return forward


#: Global attention over more tokens than this is computed in chunks of query rows (see :func:`export_friendly`).
CHUNKED_ATTENTION_MIN_TOKENS = 1024
#: Query rows of the token grid per chunk: 8 rows of MedSAM ViT-B's 64x64 grid = 512 queries, so each chunk's
#: scores are 12 heads x 512 x 4096 floats (96 MiB) instead of 12 x 4096 x 4096 (768 MiB) at once.
ATTENTION_CHUNK_ROWS = 8


def _is_sam_vision_attention(module: nn.Module) -> bool:
    return type(module).__name__ in ("SamVisionAttention", "SamVisionSdpaAttention") and hasattr(module, "qkv")


def _chunked_attention_forward(module: nn.Module):
    """transformers' ``SamVisionAttention.forward`` with the softmax(QK^T + rel-pos) V product computed for
    :data:`ATTENTION_CHUNK_ROWS` query rows at a time when the grid has more than
    :data:`CHUNKED_ATTENTION_MIN_TOKENS` tokens (the global blocks). Each query's softmax is over all keys, as
    before, so the result is the same function; only the score tensors alive at once shrink. The attention
    weights are not returned (``None``): export never asks for them."""
    original = type(module).forward

    def forward(hidden_states: torch.Tensor, output_attentions=None):
        b, h, w, _ = hidden_states.shape
        if h * w <= CHUNKED_ATTENTION_MIN_TOKENS:
            return original(module, hidden_states)
        heads = module.num_attention_heads
        qkv = module.qkv(hidden_states).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        dim = query.shape[-1]
        key_t = key.transpose(-2, -1)
        if module.use_rel_pos:
            table_h = module.get_rel_pos(h, h, module.rel_pos_h)  # [h (query row), h (key row), dim]
            table_w = module.get_rel_pos(w, w, module.rel_pos_w)
        outputs = []
        for r0 in range(0, h, ATTENTION_CHUNK_ROWS):
            r1 = min(h, r0 + ATTENTION_CHUNK_ROWS)
            q = query[:, r0 * w : r1 * w]
            scores = (q * module.scale) @ key_t  # [b*heads, rows*w, h*w]
            if module.use_rel_pos:
                rows = q.reshape(b * heads, r1 - r0, w, dim)
                rel_h = torch.einsum("bhwc,hkc->bhwk", rows, table_h[r0:r1])
                rel_w = torch.einsum("bhwc,wkc->bhwk", rows, table_w)
                scores = scores.reshape(b * heads, r1 - r0, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
                scores = scores.reshape(b * heads, (r1 - r0) * w, h * w)
            outputs.append(torch.softmax(scores, dim=-1) @ value)
        out = torch.cat(outputs, dim=1).reshape(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return module.proj(out), None

    return forward


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[int]:
    """Temporarily make the model export to cheaper graphs computing the same function:

    - channels-first LayerNorms (SAM's neck, mask upscaling) as a channels-last ``F.layer_norm``, which the
      exporter emits as one ``LayerNormalization`` op instead of a decomposed ReduceMean/Pow/Sqrt chain (slower,
      and overflow-prone in fp16);
    - the ViT image encoder's global attention in chunks of query rows (:func:`_chunked_attention_forward`):
      ONNX Runtime's peak memory for MedSAM ViT-B's encoder falls with it (benchmarks/RESULTS.md).

    Yields how many modules were patched."""
    patched = [m for m in model.modules() if _is_channels_first_layernorm(m) and hasattr(m, "eps")]
    for m in patched:
        m.forward = _channels_last_forward(m)
    attention = [m for m in model.modules() if _is_sam_vision_attention(m)]
    for m in attention:
        m.forward = _chunked_attention_forward(m)
    try:
        yield len(patched) + len(attention)
    finally:
        for m in patched + attention:
            del m.forward  # back to the class's forward


def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def optimize(src: Path, dst: Path) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer: Gelu/BiasGelu and SkipLayerNorm fusions, constant folding.

    Its LayerNorm fusion is off: the export already emits ``LayerNormalization`` ops, and on SAM's
    channels-first norms the optimizer's pattern matcher fuses over the wrong axis (measured: 0.27 abs error).
    Attention fusion does not match SAM's relative-position attention and is left to the runtime.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_layer_norm = False
    options.enable_embed_layer_norm = False
    options.enable_attention = False
    before = node_counts(onnx.load(str(src)))
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # its shape helper prints "Cannot retrieve the shape of ..." for every edge inside an If branch
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, optimization_options=options)
    finally:
        quiet.setLevel(level)
    opt.save_model_to_file(str(dst))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return {
        "tool": "onnxruntime.transformers.optimizer",
        "fused": fused,
        "nodes_before": before,
        "nodes_after": node_counts(opt.model),
    }


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and activations with fp32 graph I/O; ops in :data:`FP16_KEEP_FP32` stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    kept = [n.name for n in model.graph.node if n.op_type in FP16_KEEP_FP32]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
    onnx.save(converted, str(dst))
    return {
        "io": "float32",
        "kept_fp32_op_types": list(FP16_KEEP_FP32),
        "kept_fp32_nodes": len(kept),
        "casts_inserted": node_counts(converted).get("Cast", 0) - node_counts(model).get("Cast", 0),
    }


#: Ops whose output feeds a MatMul that int8 keeps in fp32 (see :func:`quantize_int8`).
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")
#: Ops that only move data between a GELU and the MatMul it feeds.
_LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
#: Integer ops the int8 graphs may contain and the input index of their weight (and weight zero point).
INTEGER_WEIGHT_INPUTS = {"MatMulInteger": (1, 3), "ConvInteger": (1, 3), "DynamicQuantizeMatMul": (1, 3)}


def gelu_fed_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes whose input is a GELU's output (through layout-only ops): the second
    linear layer of every transformer MLP."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        x = node.input[0]
        for _ in range(4):
            p = producer.get(x)
            if p is None or (p.op_type not in GELU_OPS and p.op_type not in _LAYOUT_OPS):
                break
            if p.op_type in GELU_OPS:
                names.append(node.name)
                break
            x = p.input[0]
    return names


def integer_weight_ranges(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """For every integer matrix op with a constant weight: its name, the weight's dtype and the range of
    ``weight - zero_point`` (what the kernels multiply with the uint8 activations)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        idx = INTEGER_WEIGHT_INPUTS.get(node.op_type)
        if idx is None or len(node.input) <= idx[0] or node.input[idx[0]] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[idx[0]]])
        zp_name = node.input[idx[1]] if len(node.input) > idx[1] else ""
        zp = numpy_helper.to_array(inits[zp_name]).astype(np.int32) if zp_name in inits else np.zeros(1, np.int32)
        if zp.size > 1:  # per output channel: the last axis of a MatMul weight, the first of a Conv weight
            shape = [1] * w.ndim
            shape[0 if node.op_type == "ConvInteger" else -1] = zp.size
            zp = zp.reshape(shape)
        centred = w.astype(np.int32) - zp.reshape(-1)[0] if zp.size == 1 else w.astype(np.int32) - zp
        rows.append({"node": node.name, "dtype": str(w.dtype), "min": int(centred.min()), "max": int(centred.max())})
    return rows


def saturation_free(rows: list[dict[str, Any]]) -> bool:
    """True when every integer op's products are exact on every ONNX Runtime CPU kernel: uint8 weights (the
    u8·u8 kernels widen to 16 bits before multiplying and accumulate in 32), or int8 weights within
    [-64, 64] (two u8·s8 products then sum to at most 2·255·64 = 32640 <= 32767 in magnitude, so a saturating
    16-bit pair-wise accumulation never saturates; ``reduce_range`` gives such weights)."""
    return all(r["dtype"] == "uint8" or (r["min"] >= -64 and r["max"] <= 64) for r in rows)


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation of MatMul/Gemm weights that gives the same integer products on every CPU.

    Scheme (chosen by measurement, benchmarks/RESULTS.md): per-channel **uint8** weights with dynamic uint8
    activations (u8·u8): exact on every ONNX Runtime kernel, unlike int8 weights, whose u8·s8 kernels saturate
    on CPUs without VNNI (AVX2). The MatMuls fed by a GELU (each MLP's second layer, whose heavy-tailed inputs
    lose most to per-tensor activation quantisation) stay fp32; convolutions stay fp32 (ConvInteger is slow on
    the CPU). The result is checked: every integer op must be :func:`saturation_free`.

    Raises:
        ExportError: the quantizer did not produce the expected graph (a node it renamed, a saturating weight).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from medsam_rt.errors import ExportError

    model = onnx.load(str(src))
    candidates = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    constant = {t.name for t in model.graph.initializer}
    candidates = [n.name for n in model.graph.node if n.name in candidates and n.input[1] in constant]
    keep_fp32 = gelu_fed_matmuls(model)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QUInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            # the quantizer splits a Gemm into MatMul + Add named "<gemm>_MatMul" before quantising
            nodes_to_exclude=keep_fp32 + [f"{n}_MatMul" for n in keep_fp32],
        )
    finally:
        quiet.setLevel(level)
    quantized = onnx.load(str(dst))
    ranges = integer_weight_ranges(quantized)
    if len(ranges) != len(candidates) - len(keep_fp32):
        raise ExportError(
            f"int8 quantisation of {src.name}: {len(ranges)} integer MatMuls, expected "
            f"{len(candidates) - len(keep_fp32)} ({len(candidates)} with constant weights, {len(keep_fp32)} kept fp32)"
        )
    if not saturation_free(ranges):
        raise ExportError(f"int8 quantisation of {src.name} produced weights that can saturate u8·s8 kernels")
    counts = node_counts(quantized)
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "scheme": "dynamic u8u8: per-channel uint8 weights, per-tensor uint8 activations",
        "weight_type": "QUInt8",
        "activation_type": "QUInt8 (dynamic)",
        "per_channel": True,
        "op_types": ["MatMul", "Gemm"],
        "kept_fp32": {"rule": "MatMuls fed by a GELU (MLP second layers)", "nodes": len(keep_fp32)},
        "quantized_nodes": counts.get("MatMulInteger", 0) + counts.get("DynamicQuantizeMatMul", 0),
        "saturation_free": True,
    }

"""SAM's box-prompt decoder re-associated for few queries and many keys: the same function, fewer multiply-adds.

:class:`FastBoxDecoder` computes what SAM's prompt encoder (boxes only: two corner embeddings with the random-Fourier
positional encoding, ``no_mask_embed`` as the dense embedding) and mask decoder (two-way transformer, upscaling,
hypernetwork MLP of mask token 0, IoU head; ``multimask_output=False``) compute, equal in exact arithmetic, with the
4096 image tokens touched as rarely as possible. Its weights are read from a transformers ``SamModel``
(:meth:`FastBoxDecoder.from_hf`) or from segment-anything's ``PromptEncoder`` + ``MaskDecoder``
(:meth:`FastBoxDecoder.from_segment_anything`, e.g. LiteMedSAM).

Notation: ``X`` the image tokens ``[L, C]`` (L = 64·64, C = 256), ``PE`` their positional encoding, ``t`` the 7
prompt tokens of one box (IoU token, 4 mask tokens, 2 box corners), ``h`` a head (8), ``d`` its width (16). The
re-associations, per head (never summed across heads), each exact:

- token→image attention (2 blocks + the final one): keys ``(X+PE)·Wkᵀ + bk``, values ``X·Wvᵀ + bv``.
  Scores ``q_h·Wk_h·(X+PE)ᵀ`` (``q_h·bk_h`` is constant over keys: softmax drops it) and output
  ``(P_h·X)·Wv_hᵀ + bv_h`` (rows of ``P`` sum to 1). The image tokens meet 7·h = 56 folded query rows instead
  of being projected: 2·L·C·h·d → 2·7·h·C·L multiply-adds, 268 M → 117 M per attention and box.
- image→token attention (2 blocks): scores ``(X+PE)·(Wq_hᵀ·k_hᵀ) + bq_h·k_hᵀ`` (the bias term varies over the 7
  keys, so it stays) and output ``Σ_h P_h·(v_h·Wo_hᵀ) + bo`` (271 M → 117 M).
- No bias add over the L image tokens: ``no_mask_embed`` moves into the first block's positional encoding and
  value/output biases, each image→token output bias into head 0's values (each head's weights sum to 1).
- The first block's image side (``X0 = embedding + no_mask_embed`` and ``PE``) is the same for every box of a
  call; :attr:`Levers.share_first_block` can compute its un-folded K/V (token→image) and Q (image→token)
  projections once per call from that many boxes on (an ONNX ``If`` on N; fewer multiply-adds from N = 3). Off by
  default: it did not pay when measured (``benchmarks/RESULTS.md``), and without it a box's logits do not depend
  on the other boxes of the call, bit for bit.
- Only the IoU token and mask token 0 are read at the end, so the final attention runs 2 queries, and only row 0
  of the IoU head and hypernetwork MLP 0 are computed.
- Tokens-major ``[N, L, C]`` throughout; the two 2×2-stride-2 transposed convolutions are two Gemms on the
  tokens (each token's 4×4 output pixels stay with it) and one final reshuffle of the ``[N, 256, 256]`` logits.
- Residual + LayerNorm on 2-D views: ONNX Runtime (1.32) would otherwise fuse them into its CPU
  ``SkipLayerNormalization``, measured ~5x slower than ``Add`` + ``LayerNormalization`` at [4096, 256].
- Batch-invariant bit for bit: the products that sum over the 4096 image tokens are laid out so that ONNX
  Runtime's GEMM splits them over threads by rows (``Xᵀ·Pᵀ``, not ``P·X``), so a box's logits do not depend on how
  many other boxes share its call (tested at 1–8 threads; the CUDA path's padded buckets rely on it).

:class:`Levers` switches each re-association off, for measuring what it buys (``benchmarks/decoder_levers.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from medsam_rt.errors import ExportError

if TYPE_CHECKING:
    from transformers import SamModel

UPSCALE_FORMS = ("matmul", "convtranspose")


@dataclass(frozen=True)
class Levers:
    """Which re-associations :class:`FastBoxDecoder` uses (all on by default; each off for measurements).

    Attributes:
        fold_token_to_image: fold K into the queries and V after the weighted sum (3 token→image attentions).
        fold_image_to_token_out: fold the output projection into the 7 values (2 image→token attentions).
        fold_image_to_token_query: fold the query projection into the 7 keys (2 image→token attentions).
        share_first_block: from this many boxes per call on, the first block's image-side projections are computed
            once per call (``If`` on N); 0 never (the default: measured no gain), 1 always.
        final_two_queries: the final token→image attention runs only the IoU token and mask token 0.
        fold_biases: no bias add over the L image tokens: ``no_mask_embed`` moves into the first block's positional
            encoding and biases, each image→token output bias into head 0's values (its weights sum to 1).
        norm_2d: residual + LayerNorm on a 2-D view, which keeps ONNX Runtime from fusing them into its
            ``SkipLayerNormalization`` (CPU kernel ~5x slower than Add + LayerNormalization at [4096, 256]).
        upscale: ``"matmul"`` (tokens-major Gemms) or ``"convtranspose"`` (NCHW ``ConvTranspose`` as SAM does).
    """

    fold_token_to_image: bool = True
    fold_image_to_token_out: bool = True
    fold_image_to_token_query: bool = True
    share_first_block: int = 0
    final_two_queries: bool = True
    fold_biases: bool = True
    norm_2d: bool = True
    upscale: str = "matmul"

    def __post_init__(self) -> None:
        if self.upscale not in UPSCALE_FORMS:
            raise ExportError(f"Levers.upscale={self.upscale!r}; expected one of {', '.join(UPSCALE_FORMS)}")
        if self.share_first_block < 0:
            raise ExportError(f"Levers.share_first_block={self.share_first_block}; expected >= 0 (0: never share)")

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def none(cls) -> Levers:
        """Every lever off: SAM's own order of operations (tokens-major, single mask), for measurements."""
        return cls(
            fold_token_to_image=False,
            fold_image_to_token_out=False,
            fold_image_to_token_query=False,
            share_first_block=0,
            final_two_queries=False,
            fold_biases=False,
            norm_2d=False,
            upscale="convtranspose",
        )


@dataclass(frozen=True)
class _Parts:
    """The original modules, named family-independently (plain references, nothing copied)."""

    pe_gaussian: torch.Tensor  # [2, C/2] random Fourier features of the box corners
    input_size: tuple[int, int]  # (H, W) of the encoder input the boxes are in
    dense_pe: torch.Tensor  # [1, C, h, w]
    corner_embeds: tuple[torch.Tensor, torch.Tensor]  # [1, C] each: box corner 0 and 1
    no_mask_embed: torch.Tensor  # [1, C]
    output_tokens: torch.Tensor  # [1 + num_mask_tokens, C]: IoU token, mask tokens
    blocks: list[dict[str, nn.Module]]  # self_attn, norm1, t2i, norm2, mlp, norm3, norm4, i2t
    final_attn: nn.Module
    final_norm: nn.LayerNorm
    upscale: tuple[nn.ConvTranspose2d, nn.Module, nn.ConvTranspose2d]  # conv1, channels-first norm, conv2
    upscale_act: nn.Module
    hyper_mlp: tuple[list[nn.Linear], bool]  # mask token 0's layers, sigmoid output
    iou_head: tuple[list[nn.Linear], bool]


def _heads(attn: nn.Module) -> int:
    return int(getattr(attn, "num_heads", None) or attn.num_attention_heads)


def _mlp_layers(mlp: nn.Module) -> tuple[list[nn.Linear], bool]:
    """segment-anything ``MLP`` (``layers``) or transformers ``SamFeedForward`` (``proj_in``, ``layers``,
    ``proj_out``): the Linear layers in order (ReLU between them) and whether a sigmoid follows."""
    if hasattr(mlp, "proj_in"):
        layers = [mlp.proj_in, *mlp.layers, mlp.proj_out]
    else:
        layers = list(mlp.layers)
    return layers, bool(getattr(mlp, "sigmoid_output", False))


def _transformer_parts(md: nn.Module, norm: str, final_norm: nn.LayerNorm) -> dict[str, object]:
    """The mask decoder's tokens, two-way transformer and heads; the two families name the same attributes alike,
    except the block norms (``{norm}1`` .. ``{norm}4``) and the final norm."""
    tr = md.transformer
    blocks = [
        {
            "self_attn": b.self_attn,
            "t2i": b.cross_attn_token_to_image,
            "mlp": b.mlp,
            "i2t": b.cross_attn_image_to_token,
            **{f"norm{i}": getattr(b, f"{norm}{i}") for i in range(1, 5)},
        }
        for b in tr.layers
    ]
    return {
        "output_tokens": torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0),
        "blocks": blocks,
        "final_attn": tr.final_attn_token_to_image,
        "final_norm": final_norm,
        "hyper_mlp": _mlp_layers(md.output_hypernetworks_mlps[0]),
        "iou_head": _mlp_layers(md.iou_prediction_head),
    }


def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().float()


class FastBoxDecoder(nn.Module):
    """``image_embeddings [1,C,h,w], boxes [N,4] -> low_res_logits [N,1,4h,4w], iou_scores [N,1]`` (float32).

    ``boxes`` are x0, y0, x1, y1 in the encoder-input frame (pixels of the resized, padded image). Same contract
    and, in exact arithmetic, the same function as SAM's prompt encoder + mask decoder with one box per prompt and
    ``multimask_output=False``; see the module docstring for how it is computed.
    """

    def __init__(self, parts: _Parts, levers: Levers | None = None) -> None:
        super().__init__()
        self.levers = levers or Levers()
        c = parts.output_tokens.shape[1]
        _, _, self.grid_h, self.grid_w = parts.dense_pe.shape
        self.input_size = (float(parts.input_size[0]), float(parts.input_size[1]))
        buf = self.register_buffer
        buf("pe_gaussian", _vec(parts.pe_gaussian))
        buf("corner_embeds", torch.cat([_vec(e).reshape(1, c) for e in parts.corner_embeds], 0))
        buf("output_tokens", _vec(parts.output_tokens))
        buf("no_mask_embed", _vec(parts.no_mask_embed).reshape(1, 1, c))
        buf("dense_pe", _vec(parts.dense_pe).reshape(1, c, -1).transpose(1, 2).contiguous())  # [1, L, C]
        buf("dense_pe_first", self.dense_pe + self.no_mask_embed)  # X0 + PE when X0 is the bare embedding
        self.blocks = nn.ModuleList()
        for block in parts.blocks:
            mod = nn.Module()
            mod.self_attn = _TokenAttention(block["self_attn"])
            mod.t2i = _TokenToImage(block["t2i"])
            mod.i2t = _ImageToToken(block["i2t"])
            for name in ("norm1", "norm2", "norm3", "norm4"):
                setattr(mod, name, _Norm(block[name], self.levers.norm_2d))
            mod.mlp = _Linear.stack([block["mlp"].lin1, block["mlp"].lin2])
            mod.mlp_act = block["mlp"].act
            self.blocks.append(mod)
        if self.levers.fold_biases:  # the first block's image tokens become the bare embedding
            self.blocks[0].t2i.absorb_value_offset(self.no_mask_embed.reshape(-1))
            self.blocks[0].i2t.absorb_output_offset(self.no_mask_embed.reshape(-1))
        self.final_attn = _TokenToImage(parts.final_attn)
        self.final_norm = _Norm(parts.final_norm, self.levers.norm_2d)
        conv1, norm, conv2 = parts.upscale
        self.up_norm = _Norm(norm)
        self.up_act = parts.upscale_act
        if self.levers.upscale == "matmul":
            # ConvTranspose2d(k=2, s=2): out[o, 2i+a, 2j+b] = sum_c x[c, i, j] W[c, o, a, b] + bias[o]
            for i, conv in ((1, conv1), (2, conv2)):
                w = conv.weight.detach().float()  # [C_in, C_out, 2, 2]
                buf(f"up{i}_w", w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous())  # [(a, b, o), C_in]
                buf(f"up{i}_b", _vec(conv.bias).repeat(4))
        else:
            self.up_conv1, self.up_conv2 = conv1, conv2
        hyper, self.hyper_sigmoid = parts.hyper_mlp
        self.hyper = _Linear.stack(hyper)
        iou, self.iou_sigmoid = parts.iou_head
        self.iou = _Linear.stack(iou, last_rows=1)  # single-mask output: only mask 0's IoU estimate
        self.dims = _Dims(
            c=c,
            tokens=parts.output_tokens.shape[0] + 2,
            image_tokens=self.grid_h * self.grid_w,
            heads=self.blocks[0].t2i.h,
            cross=self.blocks[0].t2i.h * self.blocks[0].t2i.d,
            self_attn=self.blocks[0].self_attn.h * self.blocks[0].self_attn.d,
            mlp=self.blocks[0].mlp.w0.shape[0],
            blocks=len(self.blocks),
            up1=conv1.weight.shape[1],
            up2=conv2.weight.shape[1],
            hyper=[w.shape[1] for w in (getattr(self.hyper, f"w{i}") for i in range(self.hyper.n))],
            iou=[w.shape[1] for w in (getattr(self.iou, f"w{i}") for i in range(self.iou.n))],
        )

    def macs(self, n: int) -> int:
        """Multiply-adds of one call with ``n`` boxes, as this module computes it (see :func:`decoder_macs`)."""
        return decoder_macs(self.dims, n, self.levers)

    # -- construction from the two families --------------------------------------------------------------------

    @classmethod
    def from_hf(cls, sam: SamModel, levers: Levers | None = None) -> FastBoxDecoder:
        """From a transformers ``SamModel`` (``prompt_encoder``, ``mask_decoder``, ``shared_image_embedding``)."""
        pe, md = sam.prompt_encoder, sam.mask_decoder
        size = int(pe.input_image_size)
        with torch.no_grad():
            dense_pe = sam.get_image_wide_positional_embeddings()
        return cls(
            _Parts(
                pe_gaussian=pe.shared_embedding.positional_embedding,
                input_size=(size, size),
                dense_pe=dense_pe,
                corner_embeds=(pe.point_embed[2].weight, pe.point_embed[3].weight),
                no_mask_embed=pe.no_mask_embed.weight,
                upscale=(md.upscale_conv1, md.upscale_layer_norm, md.upscale_conv2),
                upscale_act=md.activation,
                **_transformer_parts(md, "layer_norm", md.transformer.layer_norm_final_attn),
            ),
            levers,
        ).eval()

    @classmethod
    def from_segment_anything(
        cls, prompt_encoder: nn.Module, mask_decoder: nn.Module, levers: Levers | None = None
    ) -> FastBoxDecoder:
        """From segment-anything-style ``PromptEncoder`` + ``MaskDecoder`` modules (LiteMedSAM's)."""
        pe, md = prompt_encoder, mask_decoder
        up = md.output_upscaling  # ConvTranspose2d, LayerNorm2d, act, ConvTranspose2d, act
        if type(up[2]) is not type(up[4]):
            raise ExportError(f"mask upscaling uses two activations ({up[2]}, {up[4]}); expected one kind")
        with torch.no_grad():
            dense_pe = pe.get_dense_pe()
        return cls(
            _Parts(
                pe_gaussian=pe.pe_layer.positional_encoding_gaussian_matrix,
                input_size=tuple(int(v) for v in pe.input_image_size),
                dense_pe=dense_pe,
                corner_embeds=(pe.point_embeddings[2].weight, pe.point_embeddings[3].weight),
                no_mask_embed=pe.no_mask_embed.weight,
                upscale=(up[0], up[1], up[3]),
                upscale_act=up[2],
                **_transformer_parts(md, "norm", md.transformer.norm_final_attn),
            ),
            levers,
        ).eval()

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = boxes.shape[0]
        c = self.output_tokens.shape[1]
        lev = self.levers
        # prompt encoder: box corners (+0.5: pixel centres) -> random Fourier features + corner embeddings
        coords = (boxes + 0.5).reshape(n, 2, 2)
        coords = coords / torch.tensor([self.input_size[1], self.input_size[0]], dtype=boxes.dtype)
        coords = (2 * coords - 1) @ self.pe_gaussian
        coords = 2 * math.pi * coords
        corners = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1) + self.corner_embeds
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(n, -1, -1), corners], dim=1)  # [N, 7, C]

        xt = image_embeddings.reshape(1, c, -1)  # [1, C, L]: X0ᵀ, the same for all boxes
        if not lev.fold_biases:
            xt = xt + self.no_mask_embed.reshape(1, c, 1)
        x = xt.transpose(1, 2)  # [1, L, C]
        queries = tokens
        for i, blk in enumerate(self.blocks):
            first = i == 0
            if first:  # the first block adds no positional encoding to the self-attention, and has no residual
                queries = blk.norm1(blk.self_attn(queries, queries, queries))
            else:
                q = queries + tokens
                queries = blk.norm1.residual(queries, blk.self_attn(q, q, queries))
            xp = x + (self.dense_pe_first if first and lev.fold_biases else self.dense_pe)
            share = first and lev.share_first_block > 0
            t2i = blk.t2i(queries + tokens, xp, x, share, lev, xt if first else None)
            queries = blk.norm2.residual(queries, t2i)
            queries = blk.norm3.residual(queries, blk.mlp(queries, blk.mlp_act))
            attn = blk.i2t(xp, queries + tokens, queries, share, lev)
            x = blk.norm4.residual(x, attn)  # [N, L, C] from here on
        xp = x + self.dense_pe
        k = 2 if lev.final_two_queries else queries.shape[1]
        q = queries[:, :k]
        q = self.final_norm.residual(q, self.final_attn(q + tokens[:, :k], xp, x, False, lev))
        iou = self.iou(q[:, 0], nn.ReLU())
        hyper = self.hyper(q[:, 1], nn.ReLU())
        if self.iou_sigmoid:
            iou = torch.sigmoid(iou)
        if self.hyper_sigmoid:
            hyper = torch.sigmoid(hyper)
        logits = self._masks(x, hyper)
        return logits, iou

    def _masks(self, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Upscaled image tokens ``x [N, L, C]`` dotted with mask token 0's ``hyper [N, C/8]`` -> ``[N,1,4h,4w]``."""
        n, _, c = x.shape
        h, w = self.grid_h, self.grid_w
        if self.levers.upscale == "convtranspose":
            y = self.up_conv1(x.transpose(1, 2).reshape(n, c, h, w))
            y = self.up_act(self.up_norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            y = self.up_act(self.up_conv2(y))  # [N, C/8, 4h, 4w]
            return (hyper.unsqueeze(1) @ y.reshape(n, y.shape[1], -1)).reshape(n, 1, 4 * h, 4 * w)
        # 2-D (Gemm with its bias) on all N*L tokens
        y = F.linear(x.reshape(-1, c), self.up1_w, self.up1_b)  # [N*L, (a, b, C/4)]: (a, b) the sub-pixel
        y = self.up_act(self.up_norm(y.reshape(-1, self.up2_w.shape[1])))  # [N*L*4, C/4]
        y = self.up_act(F.linear(y, self.up2_w, self.up2_b))  # [N*L*4, (a', b', C/8)]
        # hyperᵀ·yᵀ (one row against L*16 columns) rather than y·hyper: ONNX Runtime's single-row kernel sums
        # each pixel in the same order whatever N and the thread count (y·hyper's does not at 8 threads)
        m = hyper.unsqueeze(1) @ y.reshape(n, -1, hyper.shape[1]).transpose(-1, -2)  # [N, 1, L*16]
        # (i, j, a, b, a', b') -> row 4i + 2a + a', column 4j + 2b + b'
        m = m.reshape(n, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return m.reshape(n, 1, 4 * h, 4 * w)


@dataclass(frozen=True)
class _Dims:
    """A SAM decoder's sizes: width C, prompt tokens T (7), image tokens L (4096), cross-attention heads and inner
    width, self-attention inner width, token-MLP width, blocks, upscaling channels, head-MLP layer inputs."""

    c: int
    tokens: int
    image_tokens: int
    heads: int
    cross: int
    self_attn: int
    mlp: int
    blocks: int
    up1: int
    up2: int
    hyper: list[int]
    iou: list[int]


def decoder_macs(dims: _Dims, n: int, levers: Levers | None) -> int:
    """Multiply-adds (matrix products only) of one decoder call with ``n`` boxes.

    ``levers=None``: SAM's own order (the library decoder: every projection of the L image tokens, all
    ``T - 2`` mask tokens upscaled and predicted); otherwise :class:`FastBoxDecoder` with these levers.
    """
    c, t, L, h, ci, cs = dims.c, dims.tokens, dims.image_tokens, dims.heads, dims.cross, dims.self_attn
    masks = 1 if levers is not None else t - 3
    tokens = dims.blocks * (t * c * cs * 4 + 2 * t * t * cs + 2 * t * c * dims.mlp + 2 * t * c * ci)
    heads = masks * sum(i * o for i, o in zip(dims.hyper, [*dims.hyper[1:], dims.up2], strict=True))
    heads += sum(i * o for i, o in zip(dims.iou, [*dims.iou[1:], masks], strict=True))
    upscale = L * c * 4 * dims.up1 + 4 * L * dims.up1 * 4 * dims.up2 + masks * 16 * L * dims.up2
    per_call, per_box = 0, tokens + heads + upscale
    if levers is None:
        t2i = 2 * L * c * ci + 2 * t * L * ci + 2 * t * c * ci
        i2t = 2 * L * c * ci + 2 * t * L * ci
        return n * (per_box + (dims.blocks + 1) * t2i + dims.blocks * i2t)
    shared = levers.share_first_block > 0 and n >= levers.share_first_block
    for block in range(dims.blocks + 1):
        first, final = block == 0, block == dims.blocks
        tq = 2 if final and levers.final_two_queries else t
        per_box += 2 * tq * c * ci  # the queries' projection in and out
        if first and shared:
            per_call += 2 * L * c * ci
            per_box += 2 * tq * L * ci
        elif levers.fold_token_to_image:
            per_box += 2 * tq * h * c * L + 2 * tq * ci * c
        else:
            per_box += 2 * L * c * ci + 2 * tq * L * ci
        if final:
            break
        if first and shared:
            per_call += L * c * ci
            per_box += L * t * ci
        elif levers.fold_image_to_token_query:
            per_box += L * c * h * t + t * ci * c
        else:
            per_box += L * c * ci + L * t * ci
        per_box += L * h * t * c + t * ci * c if levers.fold_image_to_token_out else L * t * ci + L * ci * c
    return per_call + n * per_box


class _Norm(nn.Module):
    """LayerNorm over the last axis (a transformers ``SamLayerNorm`` / segment-anything ``LayerNorm2d`` applied
    channels-last), eps taken from the original."""

    def __init__(self, norm: nn.Module, flat: bool = True) -> None:
        super().__init__()
        self.register_buffer("weight", _vec(norm.weight))
        self.register_buffer("bias", _vec(norm.bias))
        self.eps = float(norm.eps)
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x + y)``, normalised on a 2-D view so that neither ONNX Runtime nor its transformer
        optimizer fuses the pair into ``SkipLayerNormalization`` (on the CPU ~5x slower than Add + LayerNorm
        at [4096, 256] in onnxruntime 1.32; both fusions only match 3-D inputs)."""
        s = x + y
        return self(s.reshape(-1, s.shape[-1])).reshape(s.shape) if self.flat else self(s)


class _Linear(nn.Module):
    """A chain of Linear layers with an activation between them (the token MLP, the hypernetwork and IoU MLPs)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
        super().__init__()
        self.n = len(weights)
        for i, (wt, bs) in enumerate(zip(weights, biases, strict=True)):
            self.register_buffer(f"w{i}", wt)
            self.register_buffer(f"b{i}", bs)

    @classmethod
    def stack(cls, layers: list[nn.Linear], last_rows: int | None = None) -> _Linear:
        weights = [_vec(layer.weight) for layer in layers]
        biases = [_vec(layer.bias) for layer in layers]
        if last_rows is not None:
            weights[-1], biases[-1] = weights[-1][:last_rows].contiguous(), biases[-1][:last_rows].contiguous()
        return cls(weights, biases)

    def forward(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        for i in range(self.n):
            x = F.linear(x, getattr(self, f"w{i}"), getattr(self, f"b{i}"))
            if i < self.n - 1:
                x = act(x)
        return x


class _Attention(nn.Module):
    """An attention's projections, per head: ``w* [h, d, C]`` (rows of the original ``[h*d, C]`` weight),
    ``b* [h, 1, d]``; the 1/sqrt(d) scale is folded into the query projection."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.h = _heads(attn)
        inner, c = attn.q_proj.weight.shape
        self.d = inner // self.h
        scale = self.d**-0.5
        for name, lin, s in (("q", attn.q_proj, scale), ("k", attn.k_proj, 1.0), ("v", attn.v_proj, 1.0)):
            w = lin.weight.detach().double() * s
            b = lin.bias.detach().double() * s
            self.register_buffer(f"w{name}", w.float().reshape(self.h, self.d, c).contiguous())
            self.register_buffer(f"b{name}", b.float().reshape(self.h, 1, self.d).contiguous())
            self.register_buffer(f"w{name}_t", w.float().t().contiguous())  # [C, h*d] for un-folded projections
            self.register_buffer(f"b{name}_flat", b.float())
        self.register_buffer("wo", _vec(attn.out_proj.weight))  # [C, h*d]
        self.register_buffer("wo_heads", _vec(attn.out_proj.weight).t().reshape(self.h, self.d, c).contiguous())
        self.register_buffer("bo", _vec(attn.out_proj.bias))

    def heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Project tokens ``x [N, T, C]`` with ``name`` in q/k/v -> ``[N, h, T, d]``."""
        n, t, _ = x.shape
        y = x @ getattr(self, f"w{name}_t") + getattr(self, f"b{name}_flat")
        return y.reshape(n, t, self.h, self.d).transpose(1, 2)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o [N, h, T, d]`` -> recombined heads -> output projection ``[N, T, C]``."""
        n, _, t, _ = o.shape
        return F.linear(o.transpose(1, 2).reshape(n, t, self.h * self.d), self.wo, self.bo)


class _TokenAttention(_Attention):
    """Self-attention among the 7 prompt tokens (small; as SAM computes it)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.heads(q, "q") @ self.heads(k, "k").transpose(-1, -2), dim=-1)
        return self.out(p @ self.heads(v, "v"))


class _TokenToImage(_Attention):
    """Prompt tokens (queries) attending to the image tokens (keys ``X + PE``, values ``X``)."""

    def forward(
        self,
        q: torch.Tensor,
        xp: torch.Tensor,
        x: torch.Tensor,
        share: bool,
        lev: Levers,
        xt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q [N, T, C]``, ``xp = X + PE`` and ``x = X`` ``[1 or N, L, C]`` -> ``[N, T, C]``.

        ``xt``: ``Xᵀ [1, C, L]`` when ``X`` is the first block's (the embedding as it comes, in NCHW).
        ``share``: from ``lev.share_first_block`` boxes on, project the first block's ``X`` once per call.
        """
        qh = self.heads(q, "q")  # [N, h, T, d], scaled
        own_scores = self._scores_folded if lev.fold_token_to_image else self._scores_projected
        own_values = self._values_folded if lev.fold_token_to_image else self._values_projected
        # shared: two Ifs around the products, the Softmax between them (an fp16 conversion, which looks at the
        # top-level graph only, keeps it fp32 as it does every Softmax)
        if share:
            shared = qh.shape[0] >= lev.share_first_block
            scores = torch.cond(shared, self._scores_projected, own_scores, (qh, xp))
        else:
            scores = own_scores(qh, xp)
        p = torch.softmax(scores, dim=-1)  # [N, h, T, L]
        if share:
            return self.out(torch.cond(shared, self._values_projected, own_values, (p, x)))
        return self.out(self._values_folded(p, x, xt) if lev.fold_token_to_image else self._values_projected(p, x))

    def absorb_value_offset(self, offset: torch.Tensor) -> None:
        """The image values will be ``X - offset``: add ``Wv·offset`` to the value bias (exact)."""
        shift = self.wv_t.double().t() @ offset.double()  # [h*d]
        self.bv_flat += shift.float()
        self.bv += shift.float().reshape(self.bv.shape)

    def _scores_projected(self, qh: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """SAM's order: project the L image tokens to keys (shared by the N boxes when xp is [1, L, C])."""
        return qh @ self.heads(xp, "k").transpose(-1, -2)  # [N, h, T, L]

    def _scores_folded(self, qh: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """``q_h·Wk_h`` against the raw tokens (``q_h·bk_h`` is constant over keys: dropped) -> ``[N, h, T, L]``."""
        n, h, t, _ = qh.shape
        qk = (qh @ self.wk).reshape(n, h * t, -1)  # [N, h*T, C]
        return (qk @ xp.transpose(-1, -2)).reshape(n, h, t, -1)

    def _values_projected(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``P_h·(X·Wv_hᵀ + bv_h)`` with the L image tokens projected -> ``[N, h, T, d]``."""
        return p @ self.heads(x, "v")

    def _values_folded(self, p: torch.Tensor, x: torch.Tensor, xt: torch.Tensor | None = None) -> torch.Tensor:
        """``(P_h·X)·Wv_hᵀ + bv_h`` (rows of P sum to 1) -> ``[N, h, T, d]``.

        Computed as ``Xᵀ·Pᵀ``: C = 256 rows against 7h = 56 columns, which ONNX Runtime's GEMM splits over its
        threads by rows, so each box's values are summed in the same order whatever N (``P·X``, 56 rows against
        256 columns, is split by columns, and the column panels' K blocking changes with N): a box's logits do
        not depend on the other boxes of the call, bit for bit. ``xt``: ``Xᵀ`` when given (the first block's).
        """
        n, h, t, _ = p.shape
        xt = x.transpose(-1, -2) if xt is None else xt  # [1|N, C, L]
        px = (xt @ p.reshape(n, h * t, -1).transpose(-1, -2)).transpose(-1, -2)  # [N, C, h*T] -> [N, h*T, C]
        return px.reshape(n, h, t, -1) @ self.wv.transpose(-1, -2) + self.bv


class _ImageToToken(_Attention):
    """Image tokens (queries ``X + PE``) attending to the prompt tokens (keys ``t + t_pe``, values ``t``)."""

    def forward(self, xp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, share: bool, lev: Levers) -> torch.Tensor:
        """``xp [1 or N, L, C]``, ``k, v [N, T, C]`` -> attention output ``[N, L, C]`` (before the residual)."""
        kh = self.heads(k, "k")  # [N, h, T, d]
        n, h, t, _ = kh.shape
        own = self._scores_folded if lev.fold_image_to_token_query else self._scores_projected
        if share:
            scores = torch.cond(n >= lev.share_first_block, self._scores_projected, own, (xp, kh))
        else:
            scores = own(xp, kh)
        p = torch.softmax(scores, dim=-1)  # [N, L, h, T]
        vh = self.heads(v, "v")
        if lev.fold_image_to_token_out:
            vo = vh @ self.wo_heads  # [N, h, T, C]: v_h·Wo_hᵀ
            if lev.fold_biases:  # head 0's weights sum to 1 over its T values: bo rides on them
                bo = torch.cat([self.bo.reshape(1, 1, -1), torch.zeros_like(self.bo).expand(h - 1, 1, -1)])
                return p.reshape(n, -1, h * t) @ (vo + bo).reshape(n, h * t, -1)
            return p.reshape(n, -1, h * t) @ vo.reshape(n, h * t, -1) + self.bo
        o = p.permute(0, 2, 1, 3) @ vh  # [N, h, L, d]
        return self.out(o)

    def absorb_output_offset(self, offset: torch.Tensor) -> None:
        """Add ``offset [C]`` to the output (the residual's image tokens lost it): into the output bias."""
        self.bo += offset.float()

    def _scores_projected(self, xp: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
        """SAM's order: project the L image tokens to queries, ``[N, L, h, T]`` scores."""
        q = self.heads(xp, "q")  # [1|N, h, L, d]
        return (q @ kh.transpose(-1, -2)).permute(0, 2, 1, 3).contiguous()  # contiguous: as torch.cond asks

    def _scores_folded(self, xp: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
        """``(X+PE)·(Wq_hᵀ·k_hᵀ) + bq_h·k_hᵀ``: the L image tokens times 7h columns -> ``[N, L, h, T]``."""
        n, h, t, _ = kh.shape
        m = (kh @ self.wq).reshape(n, h * t, -1)  # [N, h*T, C]
        b = (kh @ self.bq.transpose(-1, -2)).reshape(n, 1, h * t)  # [N, 1, h*T]: varies over keys, kept
        return (xp @ m.transpose(-1, -2) + b).reshape(n, -1, h, t).contiguous()

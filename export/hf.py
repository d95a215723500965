"""The Hugging Face ``SamModel`` family: a hub id, a local ``SamModel`` directory, or fixed random weights.

Its recipe is the checkpoint's own ``SamImageProcessor`` config (``preprocessor_config.json``, or transformers 5's
``processor_config.json``) in the manifest vocabulary (:func:`preprocessing_from_processor`). The other families
that convert into a ``SamModel`` (segment-anything checkpoints) reuse :func:`hf_model_source`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import SamConfig, SamModel

from medsam_rt.errors import ExportError

from .source import Reference, Source
from .util import one_line

DEFAULT_MODEL = "flaviagiammarino/medsam-vit-base"
#: The recipe name of this family's preprocessing (the checkpoint's own SamImageProcessor config).
RECIPE = "hf-sam-image-processor"
ARCHS = ("vit-base", "tiny")
RANDOM_SEED = 20240527
# PIL resampling enum values as transformers stores them in preprocessor_config.json
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_model_source(
    sam: SamModel, preprocessing: dict[str, Any], info: dict[str, Any], processor_config: dict[str, Any] | None = None
) -> Source:
    """A :class:`Source` for a transformers ``SamModel`` (hub, local dir, random, converted ``.pth``).

    The exported decoder is :class:`~.fast_decoder.FastBoxDecoder` (the same function, re-associated); the parity
    reference stays the library's own ``SamModel`` forward.
    """
    from .fast_decoder import FastBoxDecoder
    from .graphs import EncoderGraph

    def decode(emb: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sam(image_embeddings=emb, input_boxes=boxes[None], multimask_output=False)
        return out.pred_masks[0], out.iou_scores[0]

    def full(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return sam(pixel_values=pixels, input_boxes=boxes[None], multimask_output=False).pred_masks[0]

    return Source(
        model=sam,
        encoder=EncoderGraph(sam).eval(),
        decoder=FastBoxDecoder.from_hf(sam),
        reference=Reference(
            lambda px: sam.vision_encoder(px).last_hidden_state, decode, full, bool(info.get("random_weights"))
        ),
        preprocessing=preprocessing,
        info=info,
        embed_channels=sam.config.vision_config.output_channels,
        processor_config=processor_config or {},
    )


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def tiny_config() -> SamConfig:
    """A tiny SAM: same 1024 input, 64x64 token grid and 256x256 low-res masks as ViT-B, ~0.2 M parameters."""
    return SamConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            output_channels=32,
            global_attn_indexes=[1],
            window_size=14,
            image_size=1024,
            patch_size=16,
            num_pos_feats=16,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=1024, mask_input_channels=8),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )


def randomize(model: SamModel, seed: int) -> None:
    """Fixed random weights scaled like a trained net (unit-variance activations, logits of order 1),
    so random-weight masks are not all decided by rounding noise around zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = param[0].numel() ** -0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("weight") and "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def random_source(arch: str) -> Source:
    """The architecture ``arch`` with fixed random weights (deterministic across runs)."""
    if arch not in ARCHS:
        raise ExportError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)}")
    torch.manual_seed(RANDOM_SEED)  # also fixes the positional-embedding buffer
    config = tiny_config() if arch == "tiny" else SamConfig()
    config._attn_implementation = "eager"
    model = SamModel(config).eval()
    randomize(model, RANDOM_SEED)
    processor = default_processor_config()
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().contiguous().numpy().tobytes())
    return hf_model_source(
        model,
        preprocessing_from_processor(processor),
        {
            "source": f"random:{arch}",
            "kind": "random",
            "arch": arch,
            "checksum": "sha256:" + digest.hexdigest(),
            "random_weights": True,
        },
        processor,
    )


def default_processor_config() -> dict[str, Any]:
    """``SamImageProcessor``'s default config (the PIL/numpy backend on transformers 5, the only one on 4.57)."""
    try:
        from transformers import SamImageProcessorPil as processor_class  # transformers >= 5
    except ImportError:
        from transformers import SamImageProcessor as processor_class
    return processor_class().to_dict()


def preprocessing_from_processor(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate a ``SamImageProcessor`` config (``preprocessor_config.json``) into the manifest vocabulary."""

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    if not get("do_resize", True) or not get("do_pad", True):
        raise ExportError("preprocessor_config.json sets do_resize or do_pad to false; medsam-rt needs both")
    size = get("size", {"longest_edge": 1024})
    if "longest_edge" not in size:
        raise ExportError(f"preprocessor_config.json size {size} has no 'longest_edge'; unsupported resize")
    pad = get("pad_size", {"height": 1024, "width": 1024})
    resample = get("resample", 2)
    if resample not in _RESAMPLE_NAMES:
        raise ExportError(f"preprocessor_config.json resample={resample!r} is not a known Pillow filter")
    do_rescale, do_norm = get("do_rescale", True), get("do_normalize", True)
    return {
        "recipe": RECIPE,
        "resize": "longest_side",
        "size": int(size["longest_edge"]),
        "interpolation": _RESAMPLE_NAMES[resample],
        "normalize": "rescale_mean_std",
        "rescale_factor": float(get("rescale_factor", 1 / 255)) if do_rescale else 1.0,
        "image_mean": [float(v) for v in get("image_mean", [0.485, 0.456, 0.406])] if do_norm else [0.0] * 3,
        "image_std": [float(v) for v in get("image_std", [0.229, 0.224, 0.225])] if do_norm else [1.0] * 3,
        "pad_size": [int(pad["height"]), int(pad["width"])],
        "postprocess": "upscale_crop_resize",
        "mask_threshold": 0.0,
    }


def _offline_hint(model: str) -> str:
    return (
        f"cannot fetch '{model}' from the Hugging Face hub (no network or not found). Offline options: "
        "--model DIR (a local SamModel checkpoint with its processor config), "
        "or --random-weights --arch vit-base|tiny"
    )


#: Where a checkpoint keeps its image processor's config: transformers < 5 (and hub repos made with it, such as
#: MedSAM's) write ``preprocessor_config.json``; ``SamProcessor.save_pretrained`` on transformers 5 writes
#: ``processor_config.json`` with the image processor nested under ``"image_processor"``.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def read_processor_config(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The image processor config of a SamModel checkpoint directory, from either layout (:data:`PROCESSOR_FILES`).

    Raises:
        ExportError: neither file, an unreadable one, or a ``processor_config.json`` without an image processor.
    """
    for name in PROCESSOR_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ExportError(f"cannot read {path}: {one_line(exc)}") from None
        if name == "processor_config.json":
            cfg = cfg.get("image_processor") if isinstance(cfg, dict) else None
        if not isinstance(cfg, dict):
            raise ExportError(f'{path} holds no image processor config (expected an "image_processor" object)')
        return path, cfg
    raise ExportError(
        f"{directory} has neither {' nor '.join(PROCESSOR_FILES)}; a SamModel checkpoint needs its image "
        "processor's config (save it with SamProcessor.save_pretrained or SamImageProcessor.save_pretrained)"
    )


def hf_source(model: str) -> Source:
    """Load a ``SamModel`` from a local directory or a hub id (downloaded into the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"--model {model} is a file; expected a SamModel directory or a hub id")
        kind, directory = "hf_dir", path
    else:
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ExportError(f"--model {model}: no such directory, and not a hub id of the form owner/name")
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin"]))
        except Exception as exc:  # hub errors come in many types (HTTP, offline, auth)
            raise ExportError(f"{_offline_hint(model)} [{type(exc).__name__}]") from None
        kind = "hf_hub"
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} has no config.json; a SamModel checkpoint needs it")
    processor_file, processor = read_processor_config(directory)
    weights = [directory / w for w in _WEIGHT_FILES if (directory / w).is_file()]
    if not weights:
        raise ExportError(f"{directory} has no weights ({' or '.join(_WEIGHT_FILES)})")
    try:
        config = SamConfig.from_pretrained(directory)
        config._attn_implementation = "eager"
        sam, info = SamModel.from_pretrained(
            directory, config=config, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as exc:  # a corrupt or foreign checkpoint: say which file and why, in one line
        raise ExportError(f"cannot load SamModel from {directory}: {type(exc).__name__}: {one_line(exc)}") from None
    # transformers only warns about missing/mismatched weights and initialises them randomly: refuse instead
    problems = {
        kind: [k for k in info.get(kind, []) if "positional_embedding" not in str(k)]
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})" for kind, keys in problems.items())
        raise ExportError(f"checkpoint in {directory} does not match its SamModel config: {detail}")
    sam = sam.eval()
    vision = config.vision_config
    return hf_model_source(
        sam,
        preprocessing_from_processor(processor),
        {
            "source": model if kind == "hf_hub" else str(path.resolve()),
            "kind": kind,
            "arch": f"sam-vit hidden={vision.hidden_size} layers={vision.num_hidden_layers}",
            "checksum": _sha256_files([directory / "config.json", processor_file, *weights]),
            "random_weights": False,
        },
        processor,
    )

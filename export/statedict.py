"""Checkpoint files -> state dicts of tensors, and strict loading into a module: what every family that reads a
``.pth``/``.safetensors`` file shares (:mod:`.checkpoints`, :mod:`.lite`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from medsam_rt.errors import ExportError


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

"""The model directory contract: ``manifest.json`` and the graphs' ``metadata_props``.

A model directory holds ``encoder.<precision>.onnx``, ``decoder.<precision>.onnx``
and ``manifest.json``. The runtime reads only the keys named here, so the
document (README "Model directory") and the code cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelDirError
from .preprocess import Preprocessing

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Prefix of every key medsam-rt writes into an ONNX graph's ``metadata_props``.
METADATA_PREFIX = "medsam_rt."
ROLES = ("encoder", "decoder")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph file as recorded in the manifest."""

    role: str
    precision: str
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    directory: Path
    raw: dict[str, Any]
    preprocessing: Preprocessing
    graphs: dict[tuple[str, str], GraphEntry]

    @property
    def model_id(self) -> str:
        """Identity of the model: the source id plus its checksum."""
        m = self.raw["model"]
        return f"{m['source']}@{m['checksum']}"

    @property
    def random_weights(self) -> bool:
        return bool(self.raw["model"].get("random_weights", False))

    @property
    def precisions(self) -> list[str]:
        """Precisions with both graphs present and a passed parity gate, in fp32, fp16, int8 order."""
        parity = self.raw.get("parity", {})
        return [
            p
            for p in PRECISIONS
            if ("encoder", p) in self.graphs and ("decoder", p) in self.graphs and parity.get(p, {}).get("passed")
        ]

    def choose_precision(self, requested: str, device: str) -> str:
        """Resolve ``"auto"`` (fp16 on CUDA, int8 on the CPU, else fp32) and check the choice was exported."""
        if requested == "auto":
            preferred = ("fp16", "fp32") if device == "cuda" else ("int8", "fp32")
            for p in preferred:
                if p in self.precisions:
                    return p
            requested = "fp32"
        if requested not in PRECISIONS:
            raise ModelDirError(f"unknown precision {requested!r}; expected auto, {', '.join(PRECISIONS)}")
        if requested not in self.precisions:
            raise ModelDirError(
                f"{self.directory} has no {requested} variant that passed its gate; "
                f"available: {', '.join(self.precisions) or 'none'}"
            )
        return requested

    def graph(self, role: str, precision: str) -> GraphEntry:
        try:
            return self.graphs[(role, precision)]
        except KeyError:
            exported = ", ".join(self.precisions) or "none"
            raise ModelDirError(
                f"{self.directory} has no {precision} {role}; exported precisions: {exported}"
            ) from None


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``DIR/manifest.json``; check that every graph file it lists exists with its size.

    Raises:
        ModelDirError: missing directory/manifest/graph, unknown schema, malformed entries.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory not found: {directory}")
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{directory} is not a medsam-rt model directory: {MANIFEST_NAME} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != "medsam-rt":
        raise ModelDirError(f'{path} is not a medsam-rt manifest (missing "format": "medsam-rt")')
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelDirError(f"{path} has schema_version {version!r}; this medsam-rt reads version {SCHEMA_VERSION}")
    try:
        model = raw["model"]
        _ = model["source"], model["checksum"]
        preprocessing = Preprocessing.from_dict(raw["preprocessing"])
        graphs: dict[tuple[str, str], GraphEntry] = {}
        for role in ROLES:
            for precision, entry in raw["graphs"][role].items():
                graphs[(role, precision)] = GraphEntry(
                    role, precision, directory / entry["file"], str(entry["sha256"]), int(entry["bytes"])
                )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelDirError(f"{path} is malformed: missing or invalid entry {exc}") from None
    for g in graphs.values():
        if not g.path.is_file():
            raise ModelDirError(f"{g.path.name} listed in {path} is missing")
        if g.path.stat().st_size != g.size:
            raise ModelDirError(
                f"{g.path.name} has {g.path.stat().st_size} bytes, the manifest says {g.size}: truncated or replaced"
            )
    return Manifest(directory, raw, preprocessing, graphs)

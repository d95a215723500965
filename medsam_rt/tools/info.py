"""``medsam-rt info DIR``: a model directory's manifest in a readable form."""

from __future__ import annotations

from medsam_rt.core.cpu import describe_cpu
from medsam_rt.core.manifest import Manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def describe(manifest: Manifest) -> str:
    """Model, variants (files, sizes, conversions, gates), preprocessing and versions, as aligned text."""
    raw = manifest.raw
    model = raw["model"]
    lines = [f"model directory  {manifest.directory}"]
    if manifest.random_weights:
        lines.append("                 RANDOM WEIGHTS: for tests and benchmarks only; masks are meaningless")
    lines.append(f"model            {model['source']} ({model.get('kind', '?')}, {model.get('arch', '?')})")
    lines.append(f"checksum         {model['checksum']}")
    lines.append(f"exported         {raw.get('created', '?')} with opset {raw.get('opset', '?')}")
    lines.append(f"usable variants  {', '.join(manifest.precisions) or 'none'}")
    lines.append("")
    lines.append("variants")
    parity = raw.get("parity", {})
    for precision in ("fp32", "fp16", "int8"):
        graphs = [manifest.graphs.get((role, precision)) for role in ("encoder", "decoder")]
        if not all(graphs):
            continue
        enc, dec = graphs
        files = f"encoder {enc.path.name} ({_mib(enc.size)}), decoder {dec.path.name} ({_mib(dec.size)})"
        lines.append(f"  {precision:5s} {files}")
        lines.append(f"        {_gate_text(precision, parity.get(precision, {}))}")
        conversion = raw["graphs"]["encoder"][precision].get("conversion")
        if conversion:
            lines.append(f"        encoder conversion: {_flat(conversion)}")
    for precision, why in raw.get("failed_precisions", {}).items():
        lines.append(f"  {precision:5s} LEFT OUT: {why.get('message', why)}")
    check = raw.get("check_sample")
    if check:
        lines.append(
            f"  load-time check: {len(check['samples'])} images ({', '.join(check['samples'])}), run once per CPU "
            f"class for {', '.join(check['precisions'])}"
        )
    if raw.get("exported_on"):
        lines.append(f"  gates ran on: {describe_cpu(raw['exported_on'])}")
    lines.append("")
    lines.append("preprocessing")
    for key, value in raw["preprocessing"].items():
        lines.append(f"  {key:16s} {value}")
    lines.append("")
    lines.append("graphs' inputs and outputs")
    for role in ("encoder", "decoder"):
        entry = raw["graphs"][role].get("fp32") or next(iter(raw["graphs"][role].values()))
        for kind in ("inputs", "outputs"):
            for name, text in entry.get(kind, {}).items():
                lines.append(f"  {role} {kind[:-1]:6s} {name}: {text}")
    versions = raw.get("versions", {})
    if versions:
        lines.append("")
        lines.append("exported with    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _gate_text(precision: str, entry: dict) -> str:
    if not entry:
        return "no parity record"
    state = "passed" if entry.get("passed") else "FAILED"
    if precision == "fp32":
        checks = entry.get("checks", [])
        worst = max((c.get("max_abs_diff", 0.0) for c in checks), default=0.0)
        return f"parity vs PyTorch {state}: {len(checks)} checks, max abs diff {worst:.1e}"
    gate = entry.get("gate", {})
    text = f"gate vs fp32 {state}"
    if "min_dice" in gate:
        text += f": min Dice {gate['min_dice']:.4f}, max IoU-score diff {gate.get('max_iou_diff', 0):.4f}"
        if not gate.get("gated_on_dice", True):
            text += " (random weights: Dice reported, not gated)"
    return text


def _flat(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())

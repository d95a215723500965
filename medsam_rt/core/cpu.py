"""What CPU this is, as far as ONNX Runtime's kernels are concerned: model, instruction-set features, and a probe
of its integer matrix kernels.

ONNX Runtime (MLAS) picks its int8 and fp16 kernels by CPU feature. The ones that matter for medsam-rt's
results: without VNNI (plain AVX2, and AVX-512 before Cascade Lake) the u8·s8 kernels add pairs of products in
a saturating 16-bit lane (``vpmaddubsw``), so an int8 graph with full-range signed weights gives different
numbers there than on a VNNI CPU; u8·u8 kernels widen to 16 bits first (``vpmaddwd``) and are exact everywhere.
:func:`int8_probe` measures this directly on a two-node graph, so it also covers CPUs and emulators whose flags
say something else. :func:`cpu_class` is the key under which a variant's load-time check is remembered.
"""

from __future__ import annotations

import base64
import functools
import platform
import zlib
from typing import Any

import numpy as np
import onnxruntime as ort

#: Feature flags (Linux /proc/cpuinfo names) that select different ONNX Runtime kernels for int8/fp16/fp32 work.
KERNEL_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "sve",
    "bf16",
)
#: Flags that change the integer kernels' arithmetic (saturating pair sums or not): part of :func:`cpu_class`.
CLASS_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "avx512_fp16", "f16c")

# One graph of two MatMulInteger nodes (opset 13): a = uint8 [1, 256]; "u8s8" = a @ int8 [256, 2] (columns 127 and
# -128), "u8u8" = a @ uint8 [256, 1] (255). Built with onnx.helper and stored compressed, so the runtime needs no
# onnx package; tests/test_int8.py rebuilds and checks it.
_PROBE_MODEL = (
    "eNrj4BDizE1NKU7M1S0qsTrEziXHxZjIxZIUX2whxFJqUWyhxOubWOJbmuOZV5KanloEly8Fy5eiywuJQEyLLyqJz8wrsYgvKMpPStWawMLRwMTBJMDsB"
    "Dbaq4GlvmEUjmSoNYEJlCQYBZicwKnJq4Hp/wgHUSLAvCXEz8XLwSTEyQUMGy5mYBAliXGBM6IQHxcPB5sQB1gCmJcg4qXo4oxOLFwMArwAb8orjQ=="
)
PROBE_DEPTH = 256


def probe_model_bytes() -> bytes:
    """The serialised probe graph (see :func:`int8_probe`)."""
    return zlib.decompress(base64.b64decode(_PROBE_MODEL))


@functools.lru_cache(maxsize=1)
def int8_probe() -> dict[str, Any]:
    """Run ONNX Runtime's integer matrix kernels on inputs that saturate a 16-bit pair-wise accumulation.

    ``a`` is 255 everywhere (256 values); the exact products are 255·127·256 = 8290560, 255·(-128)·256 = -8355840
    and 255·255·256 = 16646400. A CPU whose u8·s8 kernel saturates returns 4194176 (= 128 pairs × 32767) and
    -4194304 instead.

    Returns:
        ``{"u8s8_exact": bool, "u8u8_exact": bool, "u8s8": [int, int], "u8u8": int}``.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(probe_model_bytes(), opts, providers=["CPUExecutionProvider"])
    u8s8, u8u8 = session.run(None, {"a": np.full((1, PROBE_DEPTH), 255, np.uint8)})
    exact_s8 = [255 * 127 * PROBE_DEPTH, -255 * 128 * PROBE_DEPTH]
    return {
        "u8s8_exact": [int(v) for v in u8s8[0]] == exact_s8,
        "u8u8_exact": int(u8u8[0, 0]) == 255 * 255 * PROBE_DEPTH,
        "u8s8": [int(v) for v in u8s8[0]],
        "u8u8": int(u8u8[0, 0]),
    }


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), ()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model in ("", platform.processor(), platform.machine()):
            model = value.strip() or model
        elif key in ("flags", "features") and not flags:
            flags = tuple(value.split())
    return model, flags


def cpu_info() -> dict[str, Any]:
    """Where this process runs, for reports: CPU model, machine, the kernel-relevant feature flags
    (:data:`KERNEL_FLAGS` present), the ONNX Runtime version and :func:`int8_probe`'s result."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "machine": platform.machine(),
        "isa": [f for f in KERNEL_FLAGS if f in flags],
        "onnxruntime": ort.__version__,
        "int8_probe": {k: v for k, v in int8_probe().items() if k.endswith("exact")},
    }


def cpu_class() -> str:
    """A short key for "CPUs on which ONNX Runtime computes the same numbers": machine, the flags that change
    kernel arithmetic (:data:`CLASS_FLAGS`), the probe's result and the ONNX Runtime version, e.g.
    ``x86_64:avx2+f16c:u8s8-saturates:ort1.32.0``."""
    _, flags = _cpuinfo()
    present = "+".join(f for f in CLASS_FLAGS if f in flags) or "baseline"
    probe = int8_probe()
    kernels = ("u8s8-exact" if probe["u8s8_exact"] else "u8s8-saturates") + (
        "" if probe["u8u8_exact"] else "+u8u8-inexact"
    )
    return f"{platform.machine()}:{present}:{kernels}:ort{ort.__version__}"


def describe_cpu(info: dict[str, Any] | None = None) -> str:
    """One line: ``Intel(R) Xeon(R) ... (x86_64; avx2 avx512f avx512_vnni ...; u8s8 exact; onnxruntime 1.32.0)``."""
    info = info or cpu_info()
    probe = info.get("int8_probe", {})
    u8s8 = "u8s8 exact" if probe.get("u8s8_exact") else "u8s8 saturates"
    return f"{info['cpu']} ({info['machine']}; {' '.join(info['isa']) or 'no listed ISA flags'}; {u8s8}; " + (
        f"onnxruntime {info['onnxruntime']})"
    )


__all__ = ["CLASS_FLAGS", "KERNEL_FLAGS", "cpu_class", "cpu_info", "describe_cpu", "int8_probe", "probe_model_bytes"]

"""Execution-provider resolution: the one place that maps ``device`` to ONNX Runtime providers."""

from __future__ import annotations

import logging
import os

import onnxruntime as ort

from .errors import ProviderUnavailableError

log = logging.getLogger("medsam_rt")

DEVICES = ("cpu", "cuda", "auto")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_device(device: str) -> str:
    """Return ``"cpu"`` or ``"cuda"`` for a requested ``"cpu" | "cuda" | "auto"``.

    ``"auto"`` picks CUDA when ONNX Runtime offers it, else the CPU, and logs its choice.

    Raises:
        ProviderUnavailableError: ``"cuda"`` requested but not available (lists what is).
        ValueError: unknown device name.
    """
    available = ort.get_available_providers()
    if device not in DEVICES:
        raise ProviderUnavailableError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "auto":
        chosen = "cuda" if _PROVIDER["cuda"] in available else "cpu"
        log.info("device='auto' chose %s (available providers: %s)", chosen, ", ".join(available))
        return chosen
    if _PROVIDER[device] not in available:
        raise ProviderUnavailableError(
            f"device={device!r} needs ONNX Runtime's {_PROVIDER[device]}, which this install lacks; "
            f"available: {', '.join(available)} (install medsam-rt[gpu] for CUDA)"
        )
    return device


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once where Linux tells us."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def create_session(path: str, device: str, threads: int | None = None) -> ort.InferenceSession:
    """Create an inference session for a resolved ``device`` and verify the provider really is in use."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.log_severity_level = 3
    providers = [_PROVIDER[device]] + (["CPUExecutionProvider"] if device == "cuda" else [])
    session = ort.InferenceSession(path, sess_options=opts, providers=providers)
    if session.get_providers()[0] != _PROVIDER[device]:
        raise ProviderUnavailableError(
            f"ONNX Runtime could not start {_PROVIDER[device]} for {os.path.basename(path)}; "
            f"session uses {session.get_providers()}"
        )
    return session

"""Sessions on an execution target: ``device`` resolved against :data:`medsam_rt.core.targets.TARGETS`, sessions
created on its provider (and checked to really use it), and where a profiled run placed each node."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _state

from medsam_rt.core.targets import AUTO_PREFERENCE, TARGETS, target
from medsam_rt.core.util import one_line
from medsam_rt.errors import ModelDirError, ProviderUnavailableError

log = logging.getLogger("medsam_rt")

#: ``device=`` values: every target, and "auto".
DEVICES = (*TARGETS, "auto")


def resolve_device(device: str) -> str:
    """Return ``"cpu"`` or ``"cuda"`` for a requested ``"cpu" | "cuda" | "auto"``.

    ``"auto"`` picks the first target of :data:`~medsam_rt.core.targets.AUTO_PREFERENCE` whose provider ONNX Runtime
    offers (CUDA, else the CPU) and logs its choice.

    Raises:
        ProviderUnavailableError: ``"cuda"`` requested but not available (lists what is).
        ValueError: unknown device name.
    """
    available = ort.get_available_providers()
    if device not in DEVICES:
        raise ProviderUnavailableError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "auto":
        chosen = next(name for name in AUTO_PREFERENCE if target(name).provider in available)
        log.info("device='auto' chose %s (available providers: %s)", chosen, ", ".join(available))
        return chosen
    if target(device).provider not in available:
        raise ProviderUnavailableError(
            f"device={device!r} needs ONNX Runtime's {target(device).provider}, which this install lacks; "
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


def create_session(
    path: str,
    device: str,
    threads: int | None = None,
    *,
    provider_options: Mapping[str, str] | None = None,
    free_dims: Mapping[str, int] | None = None,
    memory_pattern: bool = True,
) -> ort.InferenceSession:
    """Create an inference session for a resolved ``device`` and verify the provider really is in use.

    Args:
        provider_options: options of the target's execution provider (CUDA: see :mod:`medsam_rt.core.cuda`).
        free_dims: named dynamic dimensions fixed for this session (e.g. ``{"num_boxes": 8}``); ONNX Runtime then
            treats them as constants (shape computations fold away) and refuses other sizes.
        memory_pattern: ONNX Runtime's memory-pattern planning (one block sized for all of a run's activations).
            Off for the encoders: measured on 2 cores, the same CPU time and 45 % less peak memory (MedSAM ViT-B
            fp32 3.7 instead of 6.7 GB, LiteMedSAM 0.40 instead of 0.68 GB; benchmarks/RESULTS.md).
    """
    opts = _session_options(threads)
    opts.enable_mem_pattern = memory_pattern
    for name, value in (free_dims or {}).items():
        opts.add_free_dimension_override_by_name(name, int(value))
    return _start_session(path, device, opts, provider_options)


def _session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.log_severity_level = 3
    return opts


#: ONNX Runtime's errors for a file that is not a loadable graph (as opposed to a provider that cannot start).
_BAD_MODEL_ERRORS = tuple(
    getattr(_state, name)
    for name in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NoModel")
    if hasattr(_state, name)
) + (UnicodeDecodeError,)


def _start_session(
    path: str, device: str, opts: ort.SessionOptions, provider_options: Mapping[str, str] | None = None
) -> ort.InferenceSession:
    wanted = target(device).provider
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=target(device).providers(provider_options))
    except _BAD_MODEL_ERRORS as exc:
        raise ModelDirError(f"cannot load {path}: not a valid ONNX graph ({one_line(exc)})") from None
    except Exception as exc:  # ONNX Runtime's Fail / EPFail / RuntimeException: the provider could not run it
        raise ProviderUnavailableError(f"ONNX Runtime could not start {wanted} for {path}: {one_line(exc)}") from None
    if session.get_providers()[0] != wanted:
        raise ProviderUnavailableError(
            f"ONNX Runtime could not start {wanted} for {os.path.basename(path)}; "
            f"session uses {session.get_providers()}"
        )
    return session


# -- node placement ------------------------------------------------------------------------------------------------

#: Ops ONNX Runtime's CUDA provider deliberately leaves on the CPU when they only compute shapes (small int64
#: tensors): placing them there is expected. Any other node on the CPU, or one of these producing more than
#: :data:`SHAPE_OP_MAX_BYTES`, is a fallback that moves real data between host and device.
SHAPE_OPS = frozenset(
    {
        "Shape", "Size", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape", "Cast",
        "ConstantOfShape", "Range", "Equal", "Less", "Greater", "Where", "Expand", "Add", "Sub", "Mul", "Div",
        "Floor", "Ceil", "Sqrt", "ReduceProd", "Min", "Max", "Identity", "Flatten", "Transpose", "Not", "And",
    }
)  # fmt: skip
SHAPE_OP_MAX_BYTES = 1024


@dataclass(frozen=True)
class PlacedNode:
    """One node of an optimised graph and the execution provider that ran it."""

    name: str
    op_type: str
    provider: str
    output_bytes: int


@dataclass(frozen=True)
class NodePlacement:
    """Where ONNX Runtime placed each node of one graph (from a profiled run).

    Attributes:
        graph: file name of the graph.
        device: the resolved device the session was created for.
        nodes: every node that ran, in execution order.
    """

    graph: str
    device: str
    nodes: tuple[PlacedNode, ...]

    def counts(self) -> dict[str, int]:
        """Nodes per provider, e.g. ``{"CUDAExecutionProvider": 1210, "CPUExecutionProvider": 14}``."""
        return dict(Counter(n.provider for n in self.nodes))

    def fallbacks(self) -> list[PlacedNode]:
        """Nodes that left the requested device unexpectedly: on the CPU although the device is not the CPU,
        other than small shape computations (:data:`SHAPE_OPS`, at most :data:`SHAPE_OP_MAX_BYTES` of output)."""
        wanted = target(self.device).provider
        return [
            n
            for n in self.nodes
            if n.provider != wanted
            and not (n.op_type in SHAPE_OPS and n.output_bytes <= SHAPE_OP_MAX_BYTES)
            and not n.op_type.startswith("Memcpy")
        ]

    def summary(self) -> str:
        counts = ", ".join(f"{p}: {c}" for p, c in sorted(self.counts().items()))
        falls = self.fallbacks()
        tail = (
            "; unexpected on another provider: "
            + ", ".join(f"{n.name} ({n.op_type}, {n.provider})" for n in falls[:10])
            + (f" and {len(falls) - 10} more" if len(falls) > 10 else "")
        )
        return f"{self.graph} on {self.device}: {len(self.nodes)} nodes ({counts})" + (tail if falls else "")

    def check(self) -> None:
        """Raise :class:`ProviderUnavailableError` listing the nodes that fell back (see :meth:`fallbacks`)."""
        if self.fallbacks():
            raise ProviderUnavailableError(f"node placement check failed: {self.summary()}")


def node_placement(
    path: str | os.PathLike[str],
    device: str,
    feeds: dict[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> NodePlacement:
    """Run a graph once under ONNX Runtime's profiler and report which provider ran each node.

    Args:
        path: an ONNX graph.
        device: a resolved device (same providers as :func:`create_session`).
        feeds: inputs for the profiled run; default: zeros, with every dynamic dimension set to 1.
        threads: intra-op threads.

    Raises:
        ProviderUnavailableError: the device's provider could not start.
    """
    with tempfile.TemporaryDirectory(prefix="medsam-rt-profile-") as tmp:
        opts = _session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = _start_session(os.fspath(path), device, opts)
        if feeds is None:
            feeds = {i.name: _zeros_for(i) for i in session.get_inputs()}
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, PlacedNode] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or "provider" not in args or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        nodes.setdefault(
            name, PlacedNode(name, str(args.get("op_name", "")), str(args["provider"]), int(args.get("output_size", 0)))
        )
    return NodePlacement(os.path.basename(path), device, tuple(nodes.values()))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _zeros_for(arg: ort.NodeArg) -> np.ndarray:
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
    return np.zeros(shape, _ORT_TYPES.get(arg.type, np.float32))

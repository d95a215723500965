"""Execution targets: the one table of what each ``device=`` means to ONNX Runtime.

A target names the execution provider that runs the graphs, the device type of the ``OrtValue`` buffers the
IO-bound runner keeps there (embeddings, bucket buffers), the precision ``precision="auto"`` prefers, the option
class whose ``provider_options()`` reach that provider (CUDA: :class:`~medsam_rt.core.cuda.CudaOptions`), and whether
it can capture CUDA graphs. Everything that differs between devices reads this table instead of comparing
device names.

Adding an execution provider (CoreML, DirectML, TensorRT, the OpenVINO EP, ...) is one :class:`ExecutionTarget`
row here (plus, if it takes options, an option class like ``CudaOptions`` and a named set of them); the
facade, the runners, session creation and ``precision="auto"`` then follow it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medsam_rt.core import cuda
from medsam_rt.errors import OptionSetError


@dataclass(frozen=True)
class ExecutionTarget:
    """One device a model can run on.

    Attributes:
        name: the ``device=`` value (``"cpu"``, ``"cuda"``).
        provider: ONNX Runtime's execution provider for it.
        ortvalue_device: device type of ``OrtValue`` buffers in its memory (``OrtValue.ortvalue_from_numpy(a,
            ortvalue_device, 0)``).
        precisions: what ``precision="auto"`` picks, first exported one wins.
        options_class: the option class whose ``provider_options()`` are this provider's (``None``: it takes none;
            an option set given for another target runs its runtime choices without its provider options).
        option_sets: the named sets of ``options_class`` (:func:`resolve_options` looks names up here).
        default_options: the set a model uses when it is given none (a name in ``option_sets``), or ``None`` for
            the host runner (numpy feeds).
        options_env: environment variable that overrides ``default_options``.
        fallback_providers: providers appended to the session's list for nodes the target's provider lacks.
        captures_graphs: whether ``cuda_graph`` option sets are captured (elsewhere the same static buffers
            run without capture).
        strict_fp32: provider options that make float32 MatMuls exact float32 (no TF32), for the device masks.
        decoder_max_boxes: boxes per decoder call at most on the IO-bound runner (the host runner: always
            :data:`HOST_MAX_BOXES`).
        gpus: accelerators one loaded model occupies (what a Ray actor of ``medsam-rt batch`` asks for).
    """

    name: str
    provider: str
    ortvalue_device: str
    precisions: tuple[str, ...]
    options_class: type | None = None
    option_sets: Mapping[str, Any] = field(default_factory=dict)
    default_options: str | None = None
    options_env: str | None = None
    fallback_providers: tuple[str, ...] = ()
    captures_graphs: bool = False
    strict_fp32: dict[str, str] = field(default_factory=dict)
    decoder_max_boxes: int = 16
    gpus: int = 0

    def provider_options(self, options: Any, *, capture: bool = False) -> dict[str, str] | None:
        """The provider options ``options`` (an option set, or ``None``) gives this target's provider, with CUDA
        graph capture for a captured session; ``None`` when the set is not this target's kind."""
        if self.options_class is None or not isinstance(options, self.options_class):
            return None
        return options.provider_options(cuda_graph=capture and self.captures_graphs)

    def providers(self, provider_options: dict[str, str] | None = None) -> list[Any]:
        """The ``providers=`` list of an ``ort.InferenceSession`` for this target."""
        first = (self.provider, dict(provider_options)) if provider_options else self.provider
        return [first, *self.fallback_providers]


#: Boxes per decoder call of the host runner: the decoder's activations grow ~100 MB per box (N = 64 in one call
#: peaked at 6.8 GB RSS on LiteMedSAM) while the per-box time stops improving by N = 16.
HOST_MAX_BOXES = 16

#: Every target, by ``device=`` name.
TARGETS: dict[str, ExecutionTarget] = {
    t.name: t
    for t in (
        ExecutionTarget("cpu", "CPUExecutionProvider", "cpu", precisions=("int8", "fp32")),
        ExecutionTarget(
            "cuda",
            "CUDAExecutionProvider",
            "cuda",
            precisions=("fp16", "fp32"),
            options_class=cuda.CudaOptions,
            option_sets=cuda.OPTION_SETS,
            default_options=cuda.DEFAULT_OPTION_SET,
            options_env=cuda.OPTIONS_ENV,
            fallback_providers=("CPUExecutionProvider",),
            captures_graphs=True,
            strict_fp32={"use_tf32": "0"},
            decoder_max_boxes=cuda.DEFAULT_BUCKETS[-1],  # unmeasured: the largest bucket
            gpus=1,
        ),
    )
}

#: What ``device="auto"`` tries, in order: the first whose provider ONNX Runtime offers.
AUTO_PREFERENCE = ("cuda", "cpu")


def target(name: str) -> ExecutionTarget:
    """The target of a resolved device name (``providers.resolve_device`` names the known ones to users).

    Raises:
        KeyError: not a target.
    """
    return TARGETS[name]


def _named_sets() -> dict[str, Any]:
    """Every target's named option sets (a name given for the CPU is a CUDA set: the IO-bound runner there)."""
    sets: dict[str, Any] = {}
    for t in TARGETS.values():
        sets.update(t.option_sets)
    return sets


def resolve_options(options: Any, device: str) -> Any:
    """The option set a model on ``device`` uses, or ``None`` for the host runner (numpy feeds).

    ``None`` gives the target's default: on the CPU the host runner, on CUDA ``$MEDSAM_RT_CUDA_OPTIONS`` or
    :data:`medsam_rt.core.cuda.DEFAULT_OPTION_SET`. A name or an option-class instance applies on any target; where it
    is not the target's own kind (a CUDA set on the CPU) its provider options are not used and nothing is
    captured, but IO binding, buckets, static buffers and the postprocessing graph run the same code.

    Raises:
        OptionSetError: an unknown name (the message lists the known ones) or a value of another type.
    """
    t = target(device)
    source = "cuda_options"
    if options is None:
        env = os.environ.get(t.options_env) if t.options_env else None
        if not env and t.default_options is None:
            return None
        options = env or t.default_options
        source = f"${t.options_env}" if env else "the default"
    classes = tuple(c.options_class for c in TARGETS.values() if c.options_class is not None)
    if isinstance(options, classes):
        return options
    if isinstance(options, str):
        sets = t.option_sets or _named_sets()
        try:
            return sets[options]
        except KeyError:
            raise OptionSetError(f"unknown CUDA option set {options!r} ({source}); known: {', '.join(sets)}") from None
    names = " or ".join(c.__name__ for c in classes)
    raise OptionSetError(f"cuda_options must be a name or a {names}, got {type(options).__name__}")

"""CUDA's option sets: provider options and runtime choices, by name (:data:`OPTION_SETS`).

A set is chosen by ``MedSAM.load(..., cuda_options=NAME)`` or ``$MEDSAM_RT_CUDA_OPTIONS`` and says how the CUDA
execution provider is configured (cuDNN search, arena, NHWC) and how the IO-bound runner
(:class:`~medsam_rt.core.runners.BoundRunner`) runs: embeddings kept in device memory, box-count buckets with static
buffers, CUDA graphs, masks made on the device by the postprocessing graph. The CUDA row of
:data:`medsam_rt.core.targets.TARGETS` names this class as its option class; a set given on the CPU runs the same
runner on the CPU provider (without the CUDA provider options), which is how all of it is tested without a GPU.

Status: written and tested on the CPU provider. No option set has been measured on a GPU yet
(``benchmarks/gpu_options.py`` measures each one); the default set is ONNX Runtime's own CUDA defaults plus IO
binding and device postprocessing, not a measured choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medsam_rt.errors import OptionSetError

#: Environment variable naming the option set used on CUDA when ``MedSAM.load`` gets no ``cuda_options``.
OPTIONS_ENV = "MEDSAM_RT_CUDA_OPTIONS"
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
#: Box counts the decoder is run at when an option set uses buckets; larger N is split into chunks of the last.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class CudaOptions:
    """One set of CUDA execution-provider options and runtime choices.

    Attributes:
        name: how the set is called (reports, ``$MEDSAM_RT_CUDA_OPTIONS``).
        conv_algo_search: cuDNN convolution algorithm search: ``EXHAUSTIVE`` (ONNX Runtime's default: benchmarks
            every algorithm on the first run of each shape, slow cold start), ``HEURISTIC`` or ``DEFAULT``.
        arena_extend_strategy: ``kNextPowerOfTwo`` (default) or ``kSameAsRequested``.
        prefer_nhwc: let the CUDA provider use its NHWC convolution kernels.
        cuda_graph: capture the encoder and each bucket's decoder as CUDA graphs (needs ``buckets``).
        buckets: box counts to run the decoder at: N boxes are padded up to the next bucket (the padded rows'
            outputs are dropped) and N above the last bucket is split into chunks. Each bucket gets its own
            decoder session with N fixed, static input/output buffers and, with ``cuda_graph``, its own graph.
            Empty: one decoder session with dynamic N.
        io_binding: run through :class:`~medsam_rt.core.runners.BoundRunner` (device-resident embeddings); ``False``:
            :class:`~medsam_rt.core.runners.HostRunner`'s numpy feeds, as on the CPU (the embedding crosses to the host
            and back on every call).
        device_postprocess: make the masks with the model directory's postprocessing graph on the device (when
            the directory has one; else numpy on the host).
        description: one line for reports.
    """

    name: str = "custom"
    conv_algo_search: str = "EXHAUSTIVE"
    arena_extend_strategy: str = "kNextPowerOfTwo"
    prefer_nhwc: bool = False
    cuda_graph: bool = False
    buckets: tuple[int, ...] = ()
    io_binding: bool = True
    device_postprocess: bool = True
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.conv_algo_search not in CONV_ALGO_SEARCHES:
            raise OptionSetError(
                f"conv_algo_search {self.conv_algo_search!r}: expected one of {', '.join(CONV_ALGO_SEARCHES)}"
            )
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise OptionSetError(
                f"arena_extend_strategy {self.arena_extend_strategy!r}: expected one of {', '.join(ARENA_STRATEGIES)}"
            )
        try:
            buckets = tuple(sorted({int(b) for b in self.buckets}))
        except (TypeError, ValueError):
            raise OptionSetError(f"buckets must be positive integers, got {self.buckets!r}") from None
        if buckets and buckets[0] < 1:
            raise OptionSetError(f"buckets must be positive integers, got {self.buckets!r}")
        object.__setattr__(self, "buckets", buckets)
        if (self.cuda_graph or buckets or self.device_postprocess) and not self.io_binding:
            raise OptionSetError(
                f"option set {self.name!r}: cuda_graph, buckets and device_postprocess need io_binding"
            )
        if self.cuda_graph and not buckets:
            raise OptionSetError(
                f"option set {self.name!r}: cuda_graph needs buckets (the decoder is captured at fixed box counts)"
            )

    def provider_options(self, *, cuda_graph: bool = False) -> dict[str, str]:
        """Options for ONNX Runtime's ``CUDAExecutionProvider``; ``cuda_graph`` for a session to be captured."""
        opts = {"cudnn_conv_algo_search": self.conv_algo_search, "arena_extend_strategy": self.arena_extend_strategy}
        if self.prefer_nhwc:
            opts["prefer_nhwc"] = "1"
        if cuda_graph:
            opts["enable_cuda_graph"] = "1"
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "conv_algo_search": self.conv_algo_search,
            "arena_extend_strategy": self.arena_extend_strategy,
            "prefer_nhwc": self.prefer_nhwc,
            "cuda_graph": self.cuda_graph,
            "buckets": list(self.buckets),
            "io_binding": self.io_binding,
            "device_postprocess": self.device_postprocess,
        }


#: The named sets: ONNX Runtime's defaults, then one change at a time (what gpu_options.py measures).
OPTION_SETS: dict[str, CudaOptions] = {
    o.name: o
    for o in (
        CudaOptions("default", description="ONNX Runtime's CUDA defaults + IO binding + masks made on the device"),
        CudaOptions("heuristic-conv", conv_algo_search="HEURISTIC", description="no exhaustive cuDNN search"),
        CudaOptions("arena-same-as-requested", arena_extend_strategy="kSameAsRequested", description="tight arena"),
        CudaOptions("nhwc", prefer_nhwc=True, description="NHWC convolution kernels"),
        CudaOptions("buckets", buckets=DEFAULT_BUCKETS, description="decoder at fixed box counts, static buffers"),
        CudaOptions(
            "cuda-graph", buckets=DEFAULT_BUCKETS, cuda_graph=True, description="buckets + CUDA graphs (both graphs)"
        ),
        CudaOptions("host-postprocess", device_postprocess=False, description="IO binding, masks made with numpy"),
        CudaOptions(
            "no-io-binding",
            io_binding=False,
            device_postprocess=False,
            description="numpy feeds: the embedding crosses to the host and back on every call",
        ),
    )
}
#: The set used on CUDA when none is named. ONNX Runtime's defaults: not yet chosen by measurement.
DEFAULT_OPTION_SET = "default"


__all__ = ["DEFAULT_BUCKETS", "DEFAULT_OPTION_SET", "OPTION_SETS", "OPTIONS_ENV", "CudaOptions", "OptionSetError"]

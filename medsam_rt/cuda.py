"""The IO-binding path: embeddings that stay in device memory, box-count buckets, CUDA graphs, named option sets.

On CUDA, :class:`~medsam_rt.model.MedSAM` runs its graphs through :class:`BoundRunner`: the encoder writes the
embedding into device memory (an ``onnxruntime.OrtValue``) and the decoder reads it there; with the model
directory's postprocessing graph (``postprocess.onnx``) the masks are made on the device too, and only they, the
IoU scores and the small low-res logits cross to the host. On the CPU the numpy path stays the default; the same
runner runs on the CPU provider when asked (``cuda_options=...``), which is how all of this is tested without a
GPU.

Which provider options and runtime choices to use is a named :class:`CudaOptions` set (:data:`OPTION_SETS`),
chosen by ``MedSAM.load(..., cuda_options=NAME)`` or ``$MEDSAM_RT_CUDA_OPTIONS``.

Status: written and unit-tested on the CPU provider only. No option set has been measured on a GPU yet
(``benchmarks/gpu_options.py`` measures each one); the default set is ONNX Runtime's own CUDA defaults plus IO
binding and device postprocessing, not a measured choice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import ModelDirError, OptionSetError
from .manifest import METADATA_PREFIX, GraphEntry, Manifest, verify_graph
from .masks import MaskCrop
from .postprocess import axis_matrix
from .preprocess import Preprocessing
from .providers import create_session

#: Environment variable naming the option set used on CUDA when ``MedSAM.load`` gets no ``cuda_options``.
OPTIONS_ENV = "MEDSAM_RT_CUDA_OPTIONS"
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
#: Box counts the decoder is run at when an option set uses buckets; larger N is split into chunks of the last.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Masks made on the device are built at most this many bytes of float logits at a time (boxes per chunk).
DEVICE_CHUNK_BYTES = 256 * 2**20


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
        io_binding: run through :class:`BoundRunner` (device-resident embeddings); ``False`` feeds numpy arrays
            as the CPU path does (the embedding crosses to the host and back on every call).
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


def resolve_options(options: str | CudaOptions | None, device: str) -> CudaOptions | None:
    """The option set a model on ``device`` uses, or ``None`` for the plain numpy path.

    ``None`` gives the numpy path on the CPU, and on CUDA ``$MEDSAM_RT_CUDA_OPTIONS`` or :data:`DEFAULT_OPTION_SET`.
    A name or a :class:`CudaOptions` applies on either device; on the CPU provider its CUDA provider options are
    not used and nothing is captured, but IO binding, buckets, static buffers and the postprocessing graph run
    the same code as on CUDA.

    Raises:
        OptionSetError: an unknown name (the message lists the known ones) or a value of another type.
    """
    source = "cuda_options"
    if options is None:
        if device != "cuda":
            return None
        options = os.environ.get(OPTIONS_ENV) or DEFAULT_OPTION_SET
        source = f"${OPTIONS_ENV}" if os.environ.get(OPTIONS_ENV) else "the default"
    if isinstance(options, CudaOptions):
        return options
    if isinstance(options, str):
        try:
            return OPTION_SETS[options]
        except KeyError:
            raise OptionSetError(
                f"unknown CUDA option set {options!r} ({source}); known: {', '.join(OPTION_SETS)}"
            ) from None
    raise OptionSetError(f"cuda_options must be a name or a CudaOptions, got {type(options).__name__}")


# -- buckets --------------------------------------------------------------------------------------------------------


def bucket_plan(n: int, buckets: Sequence[int] = (), max_chunk: int | None = None) -> list[tuple[int, int, int]]:
    """How to run ``n`` boxes: ``(start, stop, rows)`` chunks, each run with ``rows >= stop - start`` boxes.

    Without buckets each chunk runs as it is (``rows == stop - start``); with buckets a chunk holds at most the
    largest bucket and is padded up to the smallest bucket that fits it. ``max_chunk`` caps the boxes per chunk
    (a memory bound). ``n == 0`` gives no chunks.
    """
    step = max(1, min(n, max_chunk or n, buckets[-1] if buckets else n)) if n else 1
    plan = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = next((b for b in buckets if b >= stop - start), stop - start) if buckets else stop - start
        plan.append((start, stop, rows))
    return plan


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with its last row repeated up to ``rows`` rows (padded boxes are valid boxes; their outputs are
    dropped). ``a`` itself when it already has ``rows``."""
    if len(a) == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])


# -- device-resident embeddings -------------------------------------------------------------------------------------

_STORED = "_stored_embeddings"  # ImageEmbedding.__dict__ key of the value as given (ndarray or OrtValue)
_HOST = "_host_embeddings"  # ... and of its host copy, made on first read
_host_lock = threading.Lock()
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class DeviceResident:
    """The ``embeddings`` field of :class:`~medsam_rt.model.ImageEmbedding` (a dataclass field descriptor).

    It holds what it is given: a numpy array (the CPU path), or an ``OrtValue`` in the model's device memory
    (IO binding). Reading it always gives a numpy array: for an ``OrtValue``, a read-only host copy made on the
    first read and kept (on CUDA a 4 MiB device-to-host copy for MedSAM), so only callers who look at the
    embedding pay for the transfer. ``segment`` never reads it (:func:`stored_value`).
    """

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            raise AttributeError("embeddings")  # a required field: no class-level default
        value = obj.__dict__[_STORED]
        if not isinstance(value, ort.OrtValue):
            return value
        with _host_lock:
            host = obj.__dict__.get(_HOST)
            if host is None:
                host = np.array(value.numpy())  # a copy: a CPU OrtValue's numpy() is a view of its buffer
                host.setflags(write=False)
                obj.__dict__[_HOST] = host
        return host

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[_STORED] = value  # only dataclass __init__ gets here: the class is frozen


def stored_value(embedding: Any) -> Any:
    """What an ImageEmbedding holds, without copying: a numpy array or an ``OrtValue`` (or whatever a caller
    put there; ``segment`` refuses anything else)."""
    return embedding.__dict__.get(_STORED)


def array_info(value: Any) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a numpy array or a tensor ``OrtValue`` on any device, without copying; else ``None``."""
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    if isinstance(value, ort.OrtValue) and value.is_tensor():
        return np.dtype(_ORT_DTYPES.get(value.data_type(), object)), tuple(value.shape())
    return None


def embedding_nbytes(embedding: Any) -> int:
    """Bytes an ImageEmbedding's array takes where it lives (the embedding cache's ``size_of``; no copy)."""
    value = stored_value(embedding)
    if isinstance(value, ort.OrtValue):
        return int(value.tensor_size_in_bytes())
    return int(np.asarray(value).nbytes)


# -- copies between OrtValues -----------------------------------------------------------------------------------------

#: How :func:`copy_into` copies between devices: "ortvalue" (``OrtValue.update_inplace(OrtValue)``, ONNX Runtime
#: 1.32+: device to device) until that fails once, then "host round trip" (through a numpy array).
copy_method = "ortvalue"


def copy_into(dst: ort.OrtValue, src: ort.OrtValue) -> None:
    """Copy ``src``'s data into ``dst``'s buffer (same shape and type); ``dst`` keeps its address, which is what
    a CUDA graph's bound inputs and outputs need."""
    global copy_method
    if copy_method == "ortvalue":
        try:
            dst.update_inplace(src)
            return
        except (TypeError, ValueError, RuntimeError):  # older ONNX Runtime: numpy arrays only
            copy_method = "host round trip"
    dst.update_inplace(np.ascontiguousarray(src.numpy()))


# -- the postprocessing graph -----------------------------------------------------------------------------------------

POSTPROCESS_ROLE = "postprocess"


def postprocess_entry(manifest: Manifest, *, verify: bool = False) -> GraphEntry | None:
    """The manifest's optional ``postprocess_graph``, checked like the other graphs (size, sha256); ``None`` for
    a directory exported without it.

    Raises:
        ModelDirError: the manifest lists it but the file is missing, truncated or edited.
    """
    raw = manifest.raw.get("postprocess_graph")
    if raw is None:
        return None
    try:
        entry = GraphEntry(
            POSTPROCESS_ROLE, "fp32", manifest.directory / raw["file"], str(raw["sha256"]), int(raw["bytes"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{manifest.directory}/manifest.json: malformed postprocess_graph entry {exc}") from None
    verify_graph(entry, full=verify)
    return entry


class BoundRunner:
    """A model's graphs run with IO binding on one device (``"cuda"``, or ``"cpu"`` for the same code on the CPU
    provider).

    Thread-safe: without static buffers every call binds its own inputs and outputs; the static buffers of the
    encoder's graph and of the bucketed decoders are used under a lock (one call at a time each).

    Args:
        encoder, decoder: the model's sessions (the encoder created with ``enable_cuda_graph`` when the option
            set captures graphs on CUDA; the decoder with dynamic N, never captured).
        decoder_path: the decoder's file, for the per-bucket sessions.
        postprocess_path: the directory's postprocessing graph, or ``None`` (masks made with numpy).
        device: resolved device.
        threads: intra-op threads of the extra sessions.
        options: the option set (``io_binding`` is true).
        preprocessing: the model's recipe (postprocess mode, pad size, mask threshold).
        max_boxes: boxes per decoder call at most (the decoder's activations grow with N); default: the largest
            bucket of :data:`DEFAULT_BUCKETS`.
    """

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        *,
        decoder_path: str | os.PathLike[str],
        postprocess_path: str | os.PathLike[str] | None,
        device: str,
        threads: int | None,
        options: CudaOptions,
        preprocessing: Preprocessing,
        max_boxes: int = DEFAULT_BUCKETS[-1],
    ) -> None:
        self.device, self.options, self.preprocessing = device, options, preprocessing
        self.max_boxes = max_boxes
        self.encoder, self.decoder = encoder, decoder
        self._decoder_path, self._threads = os.fspath(decoder_path), threads
        self._capture = options.cuda_graph and device == "cuda"  # the CPU provider has nothing to capture
        embedding_shape = [int(d) for d in encoder.get_outputs()[0].shape]
        self._low_res = int(decoder.get_outputs()[0].shape[-1])
        self._boxes_dim = decoder.get_inputs()[1].shape[0]
        if options.buckets and not isinstance(self._boxes_dim, str):
            raise OptionSetError(f"buckets need a decoder with a dynamic box count; its boxes are {self._boxes_dim}")
        self.postprocess = None
        if postprocess_path is not None and options.device_postprocess:
            # strict fp32 MatMuls (no TF32) so that the device's masks are the numpy path's
            cuda = {**options.provider_options(), "use_tf32": "0"} if device == "cuda" else None
            self.postprocess = create_session(os.fspath(postprocess_path), device, threads, provider_options=cuda)
            role = self.postprocess.get_modelmeta().custom_metadata_map.get(METADATA_PREFIX + "role")
            if role != POSTPROCESS_ROLE:
                raise ModelDirError(f"{Path(postprocess_path).name} is not a medsam-rt postprocessing graph")
            self._threshold = _device_array(np.array(preprocessing.mask_threshold, np.float32), device)
        self._matrices: OrderedDict[tuple, tuple[ort.OrtValue, ort.OrtValue]] = OrderedDict()
        self._matrices_lock = threading.Lock()
        # bucketed decoders: one session per box count, sharing one static embedding buffer (the "slot")
        self._static_lock = threading.Lock()
        self._buckets: dict[int, _StaticDecoder] = {}
        self._slot = _device_buffer(embedding_shape, device) if options.buckets else None
        self._slot_source: ort.OrtValue | None = None
        self._encoder_static = _StaticEncoder(encoder, embedding_shape, device) if options.cuda_graph else None
        if self._encoder_static is not None and self._capture:
            self._encoder_static.run(np.zeros(encoder.get_inputs()[0].shape, np.float32))  # capture at load

    def encode(self, pixel_values: np.ndarray) -> ort.OrtValue:
        """float32 ``[1,3,S,S]`` host array -> the embedding ``[1,C,64,64]`` in device memory."""
        if self._encoder_static is not None:
            return self._encoder_static.run(pixel_values)
        io = self.encoder.io_binding()
        io.bind_cpu_input("pixel_values", pixel_values)
        io.bind_output("image_embeddings", self.device)
        self.encoder.run_with_iobinding(io)
        return io.get_outputs()[0]

    def decode(
        self,
        embedding: ort.OrtValue | np.ndarray,
        boxes: np.ndarray,
        resized_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray, list[MaskCrop] | None]:
        """Decode ``boxes`` (float32 ``[N,4]``, encoder frame) on an embedding (device or host).

        Returns:
            low-res logits float32 ``(N, L, L)`` and IoU scores float32 ``(N,)`` on the host, and the N masks as
            :class:`~medsam_rt.masks.MaskCrop` when they were made on the device (``None``: make them on the
            host). The device's masks are float32 ``rows @ logits @ cols.T > threshold``: they equal the exact
            host path except at pixels whose logit is within float32 rounding of the threshold.
        """
        n, (h, w) = len(boxes), original_size
        on_device = self.postprocess is not None
        limit = min(self.max_boxes, DEVICE_CHUNK_BYTES // (4 * h * w)) if on_device else self.max_boxes
        plan = bucket_plan(n, self.options.buckets, max(1, limit))
        low_res = np.empty((n, self._low_res, self._low_res), np.float32)
        scores = np.empty(n, np.float32)
        crops: list[MaskCrop] | None = [] if on_device else None
        for start, stop, rows in plan:
            padded = pad_rows(boxes[start:stop], rows)
            with self._static_lock if self.options.buckets else contextlib.nullcontext():  # static buffers: reused
                if self.options.buckets:
                    dec = self._bucket(rows)
                    self._load_slot(embedding)
                    logits, chunk_scores = dec.run(padded)
                else:
                    logits, chunk_scores = self._run_dynamic(embedding, padded, on_device)
                low_res[start:stop] = logits.numpy()[: stop - start, 0]
                scores[start:stop] = chunk_scores.numpy()[: stop - start, 0]
                if crops is not None:  # each chunk's dense masks become crops at once: host memory O(one chunk)
                    crops.extend(
                        MaskCrop.from_dense(m) for m in self._masks(logits, stop - start, resized_size, original_size)
                    )
        return low_res, scores, crops

    def _run_dynamic(
        self, embedding: ort.OrtValue | np.ndarray, boxes: np.ndarray, on_device: bool
    ) -> tuple[ort.OrtValue, ort.OrtValue]:
        io = self.decoder.io_binding()
        if isinstance(embedding, ort.OrtValue):
            io.bind_ortvalue_input("image_embeddings", embedding)
        else:
            io.bind_cpu_input("image_embeddings", np.ascontiguousarray(embedding, np.float32))
        io.bind_cpu_input("boxes", boxes)
        io.bind_output("low_res_logits", self.device if on_device else "cpu")
        io.bind_output("iou_scores", "cpu")
        self.decoder.run_with_iobinding(io)
        logits, scores = io.get_outputs()
        return logits, scores

    def _load_slot(self, embedding: ort.OrtValue | np.ndarray) -> None:
        """Make the static embedding buffer hold ``embedding``: copied in only when it holds another one, so
        repeated calls on one image copy nothing. Caller holds the static lock."""
        if isinstance(embedding, ort.OrtValue):
            if embedding is not self._slot_source:
                copy_into(self._slot, embedding)
                self._slot_source = embedding  # encode() never writes an OrtValue it returned: identity suffices
        else:  # a host array may change in place between calls: always copy it
            self._slot.update_inplace(np.ascontiguousarray(embedding, np.float32))
            self._slot_source = None

    def _bucket(self, rows: int) -> _StaticDecoder:
        """The decoder for ``rows`` boxes, created on first use (on CUDA its graph is captured then). Caller holds
        the static lock."""
        dec = self._buckets.get(rows)
        if dec is None:
            cuda = self.options.provider_options(cuda_graph=self._capture) if self.device == "cuda" else None
            session = create_session(
                self._decoder_path, self.device, self._threads, provider_options=cuda, free_dims={self._boxes_dim: rows}
            )
            dec = self._buckets[rows] = _StaticDecoder(session, rows, self._slot, self.device, self._low_res)
            if self._capture:
                dec.run(np.tile(np.array([[0, 0, 1, 1]], np.float32), (rows, 1)))
        return dec

    def _masks(
        self, logits: ort.OrtValue, k: int, resized_size: tuple[int, int], original_size: tuple[int, int]
    ) -> np.ndarray:
        """bool ``(k, H, W)``: the postprocessing graph on the first ``k`` rows of ``logits`` (on the device)."""
        rows, cols_t = self._matrices_for(resized_size, original_size)
        io = self.postprocess.io_binding()
        io.bind_ortvalue_input("low_res_logits", logits)
        io.bind_cpu_input("num_masks", np.array([k], np.int64))
        io.bind_ortvalue_input("rows", rows)
        io.bind_ortvalue_input("cols_t", cols_t)
        io.bind_ortvalue_input("mask_threshold", self._threshold)
        io.bind_output("masks", "cpu")
        self.postprocess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[:, 0]

    def _matrices_for(self, resized: tuple[int, int], original: tuple[int, int]) -> tuple[ort.OrtValue, ort.OrtValue]:
        """The recipe's row and transposed column matrices for one image size, in device memory (the 8 most
        recently used sizes are kept)."""
        key = (tuple(resized), tuple(original))
        with self._matrices_lock:
            if key in self._matrices:
                self._matrices.move_to_end(key)
                return self._matrices[key]
        p, lr = self.preprocessing, self._low_res
        rows = axis_matrix(p.postprocess, lr, p.pad_size[0], resized[0], original[0])
        cols = axis_matrix(p.postprocess, lr, p.pad_size[1], resized[1], original[1])
        value = (_device_array(rows, self.device), _device_array(cols.T, self.device))
        with self._matrices_lock:
            self._matrices[key] = value
            while len(self._matrices) > 8:
                self._matrices.popitem(last=False)
        return value

    def report(self) -> dict[str, Any]:
        """What runs how: whether graphs are captured, the buckets built so far, where masks are made and how
        device buffers are copied."""
        return {
            "device": self.device,
            "cuda_graphs": self._capture,
            "static_buffers": bool(self.options.buckets or self.options.cuda_graph),
            "buckets_built": sorted(self._buckets),
            "postprocess": "graph on the device" if self.postprocess is not None else "numpy on the host",
            "device_copy": copy_method,
        }


def _device_buffer(shape: Sequence[int], device: str) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, device, 0)


def _device_array(a: np.ndarray, device: str) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)


class _StaticEncoder:
    """The encoder bound once to fixed input and output buffers (what a CUDA graph replays); each call copies
    the pixels in and the embedding out, into a buffer of its own."""

    def __init__(self, session: ort.InferenceSession, embedding_shape: list[int], device: str) -> None:
        self.session, self.device, self.shape = session, device, embedding_shape
        self.lock = threading.Lock()
        self.pixels = _device_buffer(session.get_inputs()[0].shape, device)
        self.out = _device_buffer(embedding_shape, device)
        self.io = session.io_binding()
        self.io.bind_ortvalue_input("pixel_values", self.pixels)
        self.io.bind_ortvalue_output("image_embeddings", self.out)

    def run(self, pixel_values: np.ndarray) -> ort.OrtValue:
        with self.lock:
            self.pixels.update_inplace(np.ascontiguousarray(pixel_values, np.float32))
            self.session.run_with_iobinding(self.io)
            embedding = _device_buffer(self.shape, self.device)
            copy_into(embedding, self.out)
            return embedding


class _StaticDecoder:
    """A decoder session with N fixed to one bucket, bound once to fixed buffers (a CUDA graph's addresses): the
    shared embedding slot, ``rows`` boxes, and its logits and scores. Caller holds the static lock."""

    def __init__(self, session: ort.InferenceSession, rows: int, slot: ort.OrtValue, device: str, low_res: int) -> None:
        self.session = session
        self.boxes = _device_buffer([rows, 4], device)
        self.logits = _device_buffer([rows, 1, low_res, low_res], device)
        self.scores = _device_buffer([rows, 1], device)
        self.io = session.io_binding()
        self.io.bind_ortvalue_input("image_embeddings", slot)
        self.io.bind_ortvalue_input("boxes", self.boxes)
        self.io.bind_ortvalue_output("low_res_logits", self.logits)
        self.io.bind_ortvalue_output("iou_scores", self.scores)

    def run(self, boxes: np.ndarray) -> tuple[ort.OrtValue, ort.OrtValue]:
        self.boxes.update_inplace(np.ascontiguousarray(boxes, np.float32))
        self.session.run_with_iobinding(self.io)
        return self.logits, self.scores

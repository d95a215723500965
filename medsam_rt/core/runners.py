"""The engines behind :class:`~medsam_rt.core.model.MedSAM`: one interface, two runners.

The facade hands a runner preprocessed pixels and gets an embedding back (:meth:`Runner.encode`), and hands it an
embedding, boxes in the encoder frame and the image's :class:`~medsam_rt.core.postprocess.UpscaleChain` and gets
low-res logits, IoU scores and one mask crop per box back (:meth:`Runner.decode`). Which runner it is, and on
which execution target (:mod:`medsam_rt.core.targets`), the facade does not know.

- :class:`HostRunner`: numpy feeds (``session.run``); the embedding is a numpy array, masks are made on the host
  by the exact float64 chain. The CPU's default.
- :class:`BoundRunner`: IO binding; the embedding stays in the target's memory as an ``OrtValue`` (on CUDA: on the
  GPU between ``embed`` and ``segment``), optionally box-count buckets with static buffers (what CUDA graphs
  replay) and masks made on the device by the model directory's postprocessing graph. CUDA's default; runs on
  the CPU provider too when given a CUDA option set, which is how it is tested without a GPU.

Both split N boxes the same way (:func:`bucket_plan`): chunks of at most the target's boxes per call, padded up to
a bucket when the option set has buckets.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from medsam_rt.core.cuda import CudaOptions
from medsam_rt.core.embedding import ImageEmbedding, stored_value
from medsam_rt.core.manifest import METADATA_PREFIX
from medsam_rt.core.masks import MaskCrop
from medsam_rt.core.ortvalues import copy_into, device_array, device_buffer
from medsam_rt.core.postprocess import UpscaleChain, axis_matrix
from medsam_rt.core.preprocess import Preprocessing
from medsam_rt.core.providers import create_session
from medsam_rt.core.targets import HOST_MAX_BOXES, ExecutionTarget
from medsam_rt.errors import ModelDirError, OptionSetError

#: Masks made on the device are built at most this many bytes of float logits at a time (boxes per chunk).
DEVICE_CHUNK_BYTES = 256 * 2**20
#: The postprocessing graph's role in its metadata.
POSTPROCESS_ROLE = "postprocess"


@dataclass(frozen=True, eq=False)
class Decoded:
    """A runner's decoder output for N boxes.

    Attributes:
        low_res_logits: float32 ``(N, L, L)`` in the encoder frame (L = 256).
        scores: float32 ``(N,)`` IoU estimates.
        crops: the N masks at the original resolution, each as its tight :class:`~medsam_rt.core.masks.MaskCrop`.
    """

    low_res_logits: np.ndarray
    scores: np.ndarray
    crops: list[MaskCrop]


class Runner(Protocol):
    """What the facade needs from an engine."""

    #: L of the decoder's ``(N, 1, L, L)`` low-res logits.
    low_res: int

    def encode(self, pixel_values: np.ndarray) -> Any:
        """float32 ``(1, 3, S, S)`` encoder input -> the embedding ``(1, C, 64, 64)`` float32: a numpy array or an
        ``OrtValue`` in the target's memory (stored in :class:`~medsam_rt.core.embedding.ImageEmbedding` as it is)."""
        ...

    def decode(self, embedding: ImageEmbedding, boxes: np.ndarray, upscale: UpscaleChain) -> Decoded:
        """Boxes float32 ``(N, 4)`` (encoder frame) on ``embedding`` -> :class:`Decoded` (masks by ``upscale``)."""
        ...

    def report(self) -> dict[str, Any] | None:
        """What runs how (``MedSAM.execution_report()["io_binding"]``); ``None`` for the host runner."""
        ...


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


def host_crops(upscale: UpscaleChain, low_res: np.ndarray) -> list[MaskCrop]:
    """The exact masks (float64 chain, O(boundary) each) of low-res logits ``(k, L, L)``."""
    return [upscale.mask_crop(logits) for logits in low_res]


class _ChunkedRunner:
    """The decode loop both runners share: one plan, the output arrays, one chunk at a time."""

    buckets: tuple[int, ...] = ()
    low_res: int  # L of the decoder's (N, 1, L, L) logits

    def decode(self, embedding: ImageEmbedding, boxes: np.ndarray, upscale: UpscaleChain) -> Decoded:
        n = len(boxes)
        source = self._source(embedding)
        low_res = np.empty((n, self.low_res, self.low_res), np.float32)
        scores = np.empty(n, np.float32)
        crops: list[MaskCrop] = []
        for start, stop, rows in bucket_plan(n, self.buckets, max(1, self._max_chunk(embedding.original_size))):
            padded = pad_rows(boxes[start:stop], rows)
            crops += self._decode_chunk(embedding, source, padded, upscale, low_res[start:stop], scores[start:stop])
        return Decoded(low_res, scores, crops)

    def _source(self, embedding: ImageEmbedding) -> Any:
        """What the decoder is fed from ``embedding``."""
        raise NotImplementedError

    def _max_chunk(self, original_size: tuple[int, int]) -> int:
        """Boxes per decoder call at most, for an image of ``original_size`` ``(H, W)``."""
        raise NotImplementedError

    def _decode_chunk(
        self,
        embedding: ImageEmbedding,
        source: Any,
        boxes: np.ndarray,
        upscale: UpscaleChain,
        low_res: np.ndarray,
        scores: np.ndarray,
    ) -> list[MaskCrop]:
        """Run ``boxes`` (padded to the chunk's rows); write the first ``k = len(low_res)`` rows' logits and scores
        into ``low_res`` ``(k, L, L)`` and ``scores`` ``(k,)``; return their k masks."""
        raise NotImplementedError


class HostRunner(_ChunkedRunner):
    """Numpy feeds: ``session.run`` on host arrays; masks by the exact chain on the host.

    Args:
        encoder, decoder: the model's sessions (any target; the embedding crosses to the host either way).
    """

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.low_res = int(decoder.get_outputs()[0].shape[-1])

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        (emb,) = self.encoder.run(["image_embeddings"], {"pixel_values": pixel_values})
        return emb

    def _source(self, embedding: ImageEmbedding) -> np.ndarray:
        return embedding.embeddings  # a device-resident one: its (kept) host copy

    def _max_chunk(self, original_size: tuple[int, int]) -> int:
        return HOST_MAX_BOXES

    def _decode_chunk(
        self,
        embedding: ImageEmbedding,
        source: np.ndarray,
        boxes: np.ndarray,
        upscale: UpscaleChain,
        low_res: np.ndarray,
        scores: np.ndarray,
    ) -> list[MaskCrop]:
        logits, iou = self.decoder.run(["low_res_logits", "iou_scores"], {"image_embeddings": source, "boxes": boxes})
        low_res[:] = logits[:, 0]
        scores[:] = iou[:, 0]
        return host_crops(upscale, low_res)

    def report(self) -> None:
        return None


class BoundRunner(_ChunkedRunner):
    """A model's graphs run with IO binding on one execution target (CUDA, or the CPU provider for the same
    code).

    Thread-safe: without static buffers every call binds its own inputs and outputs; the static buffers of the
    encoder's graph and of the bucketed decoders are used under a lock (one call at a time each).

    Args:
        encoder, decoder: the model's sessions (the encoder created for capture when the option set captures
            graphs on a target that can; the decoder with dynamic N, never captured).
        decoder_path: the decoder's file, for the per-bucket sessions.
        postprocess_path: the directory's postprocessing graph, or ``None`` (masks made with numpy).
        target: the execution target.
        threads: intra-op threads of the extra sessions.
        options: the option set (``io_binding`` is true).
        preprocessing: the model's recipe (postprocess mode, pad size, mask threshold).
    """

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        *,
        decoder_path: str | os.PathLike[str],
        postprocess_path: str | os.PathLike[str] | None,
        target: ExecutionTarget,
        threads: int | None,
        options: CudaOptions,
        preprocessing: Preprocessing,
    ) -> None:
        self.target, self.options, self.preprocessing = target, options, preprocessing
        self.device = target.ortvalue_device
        self.buckets = options.buckets
        self.encoder, self.decoder = encoder, decoder
        self._decoder_path, self._threads = os.fspath(decoder_path), threads
        self._capture = options.cuda_graph and target.captures_graphs  # the CPU provider has nothing to capture
        embedding_shape = [int(d) for d in encoder.get_outputs()[0].shape]
        self.low_res = int(decoder.get_outputs()[0].shape[-1])
        self._boxes_dim = decoder.get_inputs()[1].shape[0]
        if options.buckets and not isinstance(self._boxes_dim, str):
            raise OptionSetError(f"buckets need a decoder with a dynamic box count; its boxes are {self._boxes_dim}")
        self.postprocess = None
        if postprocess_path is not None and options.device_postprocess:
            # strict fp32 MatMuls (no TF32) so that the device's masks are the numpy path's
            provider = target.provider_options(options)
            strict = {**provider, **target.strict_fp32} if provider is not None else None
            self.postprocess = create_session(
                os.fspath(postprocess_path), target.name, threads, provider_options=strict
            )
            role = self.postprocess.get_modelmeta().custom_metadata_map.get(METADATA_PREFIX + "role")
            if role != POSTPROCESS_ROLE:
                raise ModelDirError(f"{Path(postprocess_path).name} is not a medsam-rt postprocessing graph")
            self._threshold = device_array(np.array(preprocessing.mask_threshold, np.float32), self.device)
        self._matrices: OrderedDict[tuple, tuple[ort.OrtValue, ort.OrtValue]] = OrderedDict()
        self._matrices_lock = threading.Lock()
        # bucketed decoders: one session per box count, sharing one static embedding buffer (the "slot")
        self._static_lock = threading.Lock()
        self._bucket_decoders: dict[int, _StaticDecoder] = {}
        self._slot = device_buffer(embedding_shape, self.device) if options.buckets else None
        self._slot_source: ort.OrtValue | None = None
        self._slot_copies = 0
        self._encoder_static = _StaticEncoder(encoder, embedding_shape, self.device) if options.cuda_graph else None
        if self._encoder_static is not None and self._capture:
            self._encoder_static.run(np.zeros(encoder.get_inputs()[0].shape, np.float32))  # capture at load

    def encode(self, pixel_values: np.ndarray) -> ort.OrtValue:
        """float32 ``[1,3,S,S]`` host array -> the embedding ``[1,C,64,64]`` in the target's memory."""
        if self._encoder_static is not None:
            return self._encoder_static.run(pixel_values)
        io = self.encoder.io_binding()
        io.bind_cpu_input("pixel_values", pixel_values)
        io.bind_output("image_embeddings", self.device)
        self.encoder.run_with_iobinding(io)
        return io.get_outputs()[0]

    def _source(self, embedding: ImageEmbedding) -> ort.OrtValue | np.ndarray:
        return stored_value(embedding)  # where it lives: never copied to the host here

    def _max_chunk(self, original_size: tuple[int, int]) -> int:
        h, w = original_size
        limit = self.target.decoder_max_boxes
        return min(limit, DEVICE_CHUNK_BYTES // (4 * h * w)) if self.postprocess is not None else limit

    def _decode_chunk(
        self,
        embedding: ImageEmbedding,
        source: ort.OrtValue | np.ndarray,
        boxes: np.ndarray,
        upscale: UpscaleChain,
        low_res: np.ndarray,
        scores: np.ndarray,
    ) -> list[MaskCrop]:
        """The device's masks are float32 ``rows @ logits @ cols.T > threshold``: they equal the exact host path
        except at pixels whose logit is within float32 rounding of the threshold."""
        k = len(low_res)
        with self._static_lock if self.buckets else contextlib.nullcontext():  # static buffers: reused
            if self.buckets:
                dec = self._bucket(len(boxes))
                self._load_slot(source)
                logits, chunk_scores = dec.run(boxes)
            else:
                logits, chunk_scores = self._run_dynamic(source, boxes)
            low_res[:] = logits.numpy()[:k, 0]
            scores[:] = chunk_scores.numpy()[:k, 0]
            dense = None
            if self.postprocess is not None:
                dense = self._masks(logits, k, embedding.resized_size, embedding.original_size)
        if dense is None:
            return host_crops(upscale, low_res)  # outside the lock: the static buffers are free again
        return [MaskCrop.from_dense(m) for m in dense]  # each chunk's dense masks become crops: host memory O(chunk)

    def _run_dynamic(self, embedding: ort.OrtValue | np.ndarray, boxes: np.ndarray) -> tuple[ort.OrtValue, ...]:
        io = self.decoder.io_binding()
        if isinstance(embedding, ort.OrtValue):
            io.bind_ortvalue_input("image_embeddings", embedding)
        else:
            io.bind_cpu_input("image_embeddings", np.ascontiguousarray(embedding, np.float32))
        io.bind_cpu_input("boxes", boxes)
        io.bind_output("low_res_logits", self.device if self.postprocess is not None else "cpu")
        io.bind_output("iou_scores", "cpu")
        self.decoder.run_with_iobinding(io)
        logits, scores = io.get_outputs()
        return logits, scores

    def _load_slot(self, embedding: ort.OrtValue | np.ndarray) -> None:
        """Make the static embedding buffer hold ``embedding``: copied in only when it holds another one, so
        repeated calls on one image copy nothing. Caller holds the static lock."""
        if isinstance(embedding, ort.OrtValue):
            if embedding is self._slot_source:
                return
            copy_into(self._slot, embedding)
            self._slot_source = embedding  # encode() never writes an OrtValue it returned: identity suffices
        else:  # a host array may change in place between calls: always copy it
            self._slot.update_inplace(np.ascontiguousarray(embedding, np.float32))
            self._slot_source = None
        self._slot_copies += 1

    def _bucket(self, rows: int) -> _StaticDecoder:
        """The decoder for ``rows`` boxes, created on first use (on CUDA its graph is captured then). Caller holds
        the static lock."""
        dec = self._bucket_decoders.get(rows)
        if dec is None:
            session = create_session(
                self._decoder_path,
                self.target.name,
                self._threads,
                provider_options=self.target.provider_options(self.options, capture=True),
                free_dims={self._boxes_dim: rows},
            )
            dec = self._bucket_decoders[rows] = _StaticDecoder(session, rows, self._slot, self.device, self.low_res)
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
        p, lr = self.preprocessing, self.low_res
        rows = axis_matrix(p.postprocess, lr, p.pad_size[0], resized[0], original[0])
        cols = axis_matrix(p.postprocess, lr, p.pad_size[1], resized[1], original[1])
        value = (device_array(rows, self.device), device_array(cols.T, self.device))
        with self._matrices_lock:
            self._matrices[key] = value
            while len(self._matrices) > 8:
                self._matrices.popitem(last=False)
        return value

    def report(self) -> dict[str, Any]:
        """What runs how: whether graphs are captured, the buckets built so far, where masks are made, how device
        buffers are copied and how often the static embedding buffer was refilled."""
        from medsam_rt.core import ortvalues

        return {
            "device": self.target.name,
            "cuda_graphs": self._capture,
            "static_buffers": bool(self.options.buckets or self.options.cuda_graph),
            "buckets_built": sorted(self._bucket_decoders),
            "postprocess": "graph on the device" if self.postprocess is not None else "numpy on the host",
            "device_copy": ortvalues.copy_method,
            "embedding_slot_copies": self._slot_copies,
        }


def make_runner(
    encoder: ort.InferenceSession,
    decoder: ort.InferenceSession,
    *,
    options: CudaOptions | None,
    target: ExecutionTarget,
    decoder_path: str | os.PathLike[str],
    postprocess_path: str | os.PathLike[str] | None,
    threads: int | None,
    preprocessing: Preprocessing,
) -> HostRunner | BoundRunner:
    """The runner an option set asks for: :class:`BoundRunner` with IO binding, else :class:`HostRunner`."""
    if options is None or not options.io_binding:
        return HostRunner(encoder, decoder)
    return BoundRunner(
        encoder,
        decoder,
        decoder_path=decoder_path,
        postprocess_path=postprocess_path,
        target=target,
        threads=threads,
        options=options,
        preprocessing=preprocessing,
    )


def session_options(options: CudaOptions | None, target: ExecutionTarget) -> dict[str, dict[str, str] | None]:
    """Provider options of the model's two sessions on ``target``: the encoder is created for capture when the
    option set captures graphs (its static buffers replay), the dynamic-N decoder never is."""
    capture = options is not None and options.cuda_graph
    return {
        "encoder": target.provider_options(options, capture=capture),
        "decoder": target.provider_options(options),
    }


class _StaticEncoder:
    """The encoder bound once to fixed input and output buffers (what a CUDA graph replays); each call copies
    the pixels in and the embedding out, into a buffer of its own."""

    def __init__(self, session: ort.InferenceSession, embedding_shape: list[int], device: str) -> None:
        self.session, self.device, self.shape = session, device, embedding_shape
        self.lock = threading.Lock()
        self.pixels = device_buffer(session.get_inputs()[0].shape, device)
        self.out = device_buffer(embedding_shape, device)
        self.io = session.io_binding()
        self.io.bind_ortvalue_input("pixel_values", self.pixels)
        self.io.bind_ortvalue_output("image_embeddings", self.out)

    def run(self, pixel_values: np.ndarray) -> ort.OrtValue:
        with self.lock:
            self.pixels.update_inplace(np.ascontiguousarray(pixel_values, np.float32))
            self.session.run_with_iobinding(self.io)
            embedding = device_buffer(self.shape, self.device)
            copy_into(embedding, self.out)
            return embedding


class _StaticDecoder:
    """A decoder session with N fixed to one bucket, bound once to fixed buffers (a CUDA graph's addresses): the
    shared embedding slot, ``rows`` boxes, and its logits and scores. Caller holds the static lock."""

    def __init__(self, session: ort.InferenceSession, rows: int, slot: ort.OrtValue, device: str, low_res: int) -> None:
        self.session = session
        self.boxes = device_buffer([rows, 4], device)
        self.logits = device_buffer([rows, 1, low_res, low_res], device)
        self.scores = device_buffer([rows, 1], device)
        self.io = session.io_binding()
        self.io.bind_ortvalue_input("image_embeddings", slot)
        self.io.bind_ortvalue_input("boxes", self.boxes)
        self.io.bind_ortvalue_output("low_res_logits", self.logits)
        self.io.bind_ortvalue_output("iou_scores", self.scores)

    def run(self, boxes: np.ndarray) -> tuple[ort.OrtValue, ort.OrtValue]:
        self.boxes.update_inplace(np.ascontiguousarray(boxes, np.float32))
        self.session.run_with_iobinding(self.io)
        return self.logits, self.scores

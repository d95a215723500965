"""The encoder's output for one image (:class:`ImageEmbedding`) and where its array lives.

An embedding's array is a numpy array (the host runner) or an ``onnxruntime.OrtValue`` in the execution target's
memory (the IO-bound runner: on CUDA the embedding stays on the GPU between ``embed`` and ``segment``). Readers of
``embedding.embeddings`` always get a numpy array; the runners read what is stored (:func:`stored_value`) and the
embedding cache sizes it where it lives (:func:`embedding_nbytes`), neither copying a device array to the host.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

_STORED = "_stored_embeddings"  # ImageEmbedding.__dict__ key of the value as given (ndarray or OrtValue)
_HOST = "_host_embeddings"  # ... and of its host copy, made on first read
_host_lock = threading.Lock()
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class DeviceResident:
    """The ``embeddings`` field of :class:`ImageEmbedding` (a dataclass field descriptor).

    It holds what it is given: a numpy array (the host runner), or an ``OrtValue`` in the model's device memory
    (the IO-bound runner). Reading it always gives a numpy array: for an ``OrtValue``, a read-only host copy made
    on the first read and kept (on CUDA a 4 MiB device-to-host copy for MedSAM), so only callers who look at the
    embedding pay for the transfer. ``segment`` never reads it on the IO-bound runner (:func:`stored_value`).
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


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """The encoder's output for one image, plus what ``segment`` needs to map boxes and masks.

    With the model's embedding cache on, the same object goes to every caller that embeds the same pixels, and
    its array is read-only.

    Attributes:
        embeddings: float32 ``(1, C, 64, 64)`` image embedding. On the IO-bound runner (CUDA, or a CUDA option
            set on the CPU) it lives in the target's memory as an ``OrtValue`` and reading this attribute copies
            it to the host once (read-only); ``segment`` never does.
        original_size: ``(H, W)`` of the image as given.
        resized_size: ``(h, w)`` of the resized image inside the encoder's padded input.
        model_id: identity of the model that made it (``segment`` refuses others).
    """

    embeddings: np.ndarray = DeviceResident()  # a numpy array, or an OrtValue in device memory read as one
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    model_id: str


def stored_value(embedding: Any) -> Any:
    """What an ImageEmbedding holds, without copying: a numpy array or an ``OrtValue`` (or whatever a caller
    put there; ``segment`` refuses anything else)."""
    return embedding.__dict__.get(_STORED)


def has_host_copy(embedding: ImageEmbedding) -> bool:
    """Whether a device-resident embedding was copied to the host (someone read ``embeddings``); ``True`` for
    an embedding held in host memory."""
    return not isinstance(stored_value(embedding), ort.OrtValue) or _HOST in embedding.__dict__


def read_only(value: Any) -> Any:
    """``value`` made read-only where that is a numpy flag (a cached embedding's host array); an ``OrtValue``
    is returned as it is (its host copy is read-only anyway)."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    return value


def array_info(value: Any) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a numpy array or a tensor ``OrtValue`` on any device, without copying; else ``None``."""
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    if isinstance(value, ort.OrtValue) and value.is_tensor():
        return np.dtype(_ORT_DTYPES.get(value.data_type(), object)), tuple(value.shape())
    return None


def embedding_nbytes(embedding: Any) -> int:
    """Bytes an ImageEmbedding's array takes where it lives (the embedding cache's default ``size_of``; a
    device-resident one is sized on the device, not copied). Other values: their ``embeddings.nbytes``."""
    if not isinstance(embedding, ImageEmbedding):
        return int(embedding.embeddings.nbytes)
    value = stored_value(embedding)
    if isinstance(value, ort.OrtValue):
        return int(value.tensor_size_in_bytes())
    return int(np.asarray(value).nbytes)


__all__ = [
    "DeviceResident",
    "ImageEmbedding",
    "array_info",
    "embedding_nbytes",
    "has_host_copy",
    "read_only",
    "stored_value",
]

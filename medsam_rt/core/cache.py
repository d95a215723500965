"""A thread-safe embedding cache, LRU-bounded by bytes.

The encoder is the expensive half of MedSAM (seconds per image on a CPU), so
:class:`~medsam_rt.core.model.MedSAM` keeps recent :class:`~medsam_rt.core.embedding.ImageEmbedding`
objects keyed by *what determines them*: the image's content (dtype, shape and
bytes, sha256), the model's identity (source, checksum, precision) and its
preprocessing recipe. Embedding the same pixels again with the same model is a
dictionary lookup; any other model, precision or recipe gets another key.

Concurrent requests for one key compute it once: the first caller runs the
encoder, the others wait for its result (a failure is not cached; waiters then
compute it themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from medsam_rt.core.embedding import embedding_nbytes

#: Upper bound of the default cache size: 64 MedSAM ViT-B embeddings (4 MiB each, float32 256x64x64).
DEFAULT_MAX_BYTES = 256 * 2**20

V = TypeVar("V")


def default_max_bytes() -> int:
    """Default budget: :data:`DEFAULT_MAX_BYTES`, or 1/32 of physical memory on smaller hosts.

    The same on every device. Embeddings count where they live: a numpy array in host memory (the host runner)
    or an ``OrtValue`` in device memory (the IO-bound runner, CUDA's default), sized there without a copy.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_MAX_BYTES
    return int(min(DEFAULT_MAX_BYTES, total // 32))


def image_digest(image: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes (equal pixels, equal digest; any other array differs)."""
    h = hashlib.sha256()
    h.update(f"{image.dtype.str}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).reshape(-1).view(np.uint8))
    return h.hexdigest()


def model_digest(model_id: str, preprocessing: Mapping[str, Any]) -> str:
    """Short digest of a model identity and its preprocessing recipe (the non-image half of a cache key)."""
    text = json.dumps({"model": model_id, "preprocessing": preprocessing}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of an :class:`EmbeddingCache`'s counters.

    Attributes:
        hits: lookups answered from the cache (including callers that waited for a concurrent computation).
        misses: lookups that had to compute the value.
        evictions: entries dropped to stay within ``max_bytes``.
        entries: entries held now.
        bytes: bytes held now (sum of the entries' sizes).
        max_bytes: the budget.
    """

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class EmbeddingCache(Generic[V]):
    """Least-recently-used cache bounded by the total size of its values, safe to share between threads.

    Args:
        max_bytes: budget; ``None``: :func:`default_max_bytes`. A value larger than the whole budget is
            returned but not kept. 0 keeps nothing (every lookup computes).
        size_of: bytes of one value (default: an ImageEmbedding's bytes where it lives, host or device,
            without copying a device-resident one to the host).
    """

    def __init__(self, max_bytes: int | None = None, size_of: Callable[[V], int] | None = None) -> None:
        max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of or embedding_nbytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._bytes = self._hits = self._misses = self._evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes, self.max_bytes)

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get(self, key: str) -> V | None:
        """The value for ``key`` (now the most recently used) or ``None``; counts a hit or a miss."""
        with self._lock:
            value = self._lookup(key)
            if value is None:
                self._misses += 1
            else:
                self._hits += 1
            return value

    def put(self, key: str, value: V) -> None:
        """Insert or replace ``key``, then evict least-recently-used entries until within ``max_bytes``."""
        size = self._size_of(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
                self._evictions += 1

    def get_or_compute(self, key: str, compute: Callable[[], V]) -> V:
        """The cached value for ``key``, or ``compute()``'s (cached); one computation per key at a time."""
        while True:
            with self._lock:
                value = self._lookup(key)
                if value is not None:
                    self._hits += 1
                    return value
                event = self._pending.get(key)
                if event is None:
                    self._pending[key] = event = threading.Event()
                    self._misses += 1
                    break
            event.wait()  # another thread computes this key; look again when it is done
        try:
            value = compute()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                del self._pending[key]
            event.set()

    def _lookup(self, key: str) -> V | None:  # caller holds the lock
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]


__all__ = ["CacheStats", "EmbeddingCache", "default_max_bytes", "image_digest", "model_digest"]

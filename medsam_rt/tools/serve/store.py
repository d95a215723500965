"""Uploaded images: read with the library's readers, kept per id with an idle expiry and a count bound.

An entry holds the :class:`~medsam_rt.io.formats.Scan` (raw values and geometry, for label volumes) and the
display range that maps its values to the 8-bit slices the model embeds (the same as ``medsam-rt segment``).
Embeddings are *not* held here: each request embeds its slice through the model's bounded embedding cache,
keyed by the slice's pixels, so a slice is encoded once while it stays in the cache, and identical uploads share
it. Identical uploads (same bytes, same window) also share one Scan.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam_rt.errors import InvalidImageError, MedSAMError
from medsam_rt.io.formats import InvalidSliceError, Scan, display_range, parse_window, read_scan, to_display

#: File name endings the readers tell formats by; anything else is told by its content.
_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]")


def client_name(filename: str | None) -> str:
    """The upload's base name as the client gave it, without directories or odd characters (for messages)."""
    base = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return _SAFE_NAME.sub("_", base)[:100] or "upload"


def _suffix(name: str, data: bytes) -> str:
    """The ending to give the temporary file: from the client's name when known, else from the content."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"  # gzip: the readers take gzip only as NIfTI
    if data[344:348] in (b"n+1\x00", b"ni1\x00") or data[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return ".nii"
    return ""  # DICOM is told by its preamble, Pillow formats by their magic


def read_upload(data: bytes, filename: str | None) -> Scan:
    """Read uploaded bytes with :func:`medsam_rt.io.formats.read_scan` through a private temporary file.

    Raises:
        InvalidImageError: empty or unreadable; messages name the client's file name, never a server path.
    """
    name = client_name(filename)
    if not data:
        raise InvalidImageError(f"{name}: the uploaded file is empty")
    with tempfile.TemporaryDirectory(prefix="medsam-serve-") as tmp:
        path = Path(tmp) / f"upload{_suffix(name, data)}"
        path.write_bytes(data)
        try:
            scan = read_scan(path)
        except MedSAMError as exc:
            raise type(exc)(str(exc).replace(os.fspath(path), name).replace(path.name, name)) from None
        except Exception as exc:  # a reader's unexpected failure on hostile bytes is still the client's input
            raise InvalidImageError(f"cannot read {name}: {type(exc).__name__}") from None
        values = np.asarray(scan.values)  # read fully before the file goes
    if values.ndim not in (3, 4) or values.shape[1] == 0 or values.shape[2] == 0:
        raise InvalidImageError(f"{name}: unsupported image of shape {values.shape[1:]}")
    return scan


@dataclass(eq=False)
class ImageEntry:
    """One uploaded image (or volume).

    Attributes:
        id: random hex id given to the client.
        scan: the file as read (``scan.values``: ``(S, H, W)`` or ``(S, H, W, C)`` raw values).
        value_range: the display range mapping values to 0..255 (``None``: 8-bit, kept as is).
        name: the client's file name (base name only), for messages and downloads.
        digest: sha256 of the uploaded bytes and the window (identical uploads share the scan).
        last_used: ``time.monotonic()`` of the last request that used it.
    """

    id: str
    scan: Scan
    value_range: tuple[float, float] | None
    name: str
    digest: str
    last_used: float = field(default_factory=time.monotonic)

    @property
    def slices(self) -> int:
        return self.scan.num_slices

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of a slice."""
        return self.scan.image_size

    def check_slice(self, k: int | None) -> int:
        """``k`` (default: the middle slice) if it is a slice of this image, else :class:`InvalidSliceError`."""
        if k is None:
            return self.slices // 2
        if not 0 <= k < self.slices:
            raise InvalidSliceError(f"slice {k} is not in {self.name}'s {self.slices} slice(s) (0..{self.slices - 1})")
        return k

    def display(self, k: int) -> np.ndarray:
        """uint8 ``(H, W)`` or ``(H, W, 3|4)``: slice ``k`` as the model embeds it (and the page shows it)."""
        return to_display(self.scan.values[k], self.value_range)


class ImageStore:
    """Images by id, at most ``max_images`` (least recently used dropped), each dropped after ``idle_timeout_s``
    without use. Thread-safe."""

    def __init__(
        self,
        max_images: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        display_cache_bytes: int = 64 << 20,
    ) -> None:
        self.max_images = max_images
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ImageEntry] = OrderedDict()
        # 8-bit display slices by (id, slice), least recently used dropped past the budget: windowing a 16-bit
        # 512x512 slice costs ~15 ms, which every request on it would pay again
        self._displays: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._display_bytes = 0
        self.display_cache_bytes = display_cache_bytes
        self.expired = 0  # dropped for idleness
        self.evicted = 0  # dropped for room

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, data: bytes, filename: str | None, window: str) -> ImageEntry:
        """Read an upload and keep it; an identical earlier upload's scan is reused.

        Raises:
            InvalidImageError, InvalidWindowError: unreadable file, unknown window or one that does not apply.
        """
        spec = parse_window(window)
        digest = hashlib.sha256(data).hexdigest() + ":" + window
        name = client_name(filename)
        with self._lock:
            twin = next((e for e in self._items.values() if e.digest == digest), None)
        if twin is not None:
            scan, value_range = twin.scan, twin.value_range
        else:
            scan = read_upload(data, filename)
            value_range = display_range(scan, spec)
        entry = ImageEntry(uuid.uuid4().hex, scan, value_range, name, digest, self._clock())
        with self._lock:
            self._items[entry.id] = entry
            while len(self._items) > self.max_images:
                old_id, _ = self._items.popitem(last=False)
                self._forget_displays(old_id)
                self.evicted += 1
        return entry

    def display(self, entry: ImageEntry, k: int) -> np.ndarray:
        """``entry.display(k)`` (read-only), kept in a bounded cache shared by all images when it had to be
        windowed; an 8-bit slice is the scan's own (a read-only view, nothing copied or cached)."""
        if entry.value_range is None:
            view = entry.display(k).view()
            view.setflags(write=False)
            return view
        key = (entry.id, k)
        with self._lock:
            cached = self._displays.get(key)
            if cached is not None:
                self._displays.move_to_end(key)
                return cached
        image = entry.display(k)  # windowed: a new array of its own
        image.setflags(write=False)
        with self._lock:
            if key not in self._displays and image.nbytes <= self.display_cache_bytes:
                self._displays[key] = image
                self._display_bytes += image.nbytes
                while self._display_bytes > self.display_cache_bytes:
                    _, old = self._displays.popitem(last=False)
                    self._display_bytes -= old.nbytes
        return image

    def _forget_displays(self, image_id: str) -> None:  # caller holds the lock
        for key in [key for key in self._displays if key[0] == image_id]:
            self._display_bytes -= self._displays.pop(key).nbytes

    def get(self, image_id: str) -> ImageEntry | None:
        """The entry (now the most recently used), or ``None`` if unknown, deleted or expired."""
        now = self._clock()
        with self._lock:
            entry = self._items.get(image_id)
            if entry is None:
                return None
            if now - entry.last_used > self.idle_timeout_s:
                del self._items[image_id]
                self._forget_displays(image_id)
                self.expired += 1
                return None
            entry.last_used = now
            self._items.move_to_end(image_id)
            return entry

    def delete(self, image_id: str) -> bool:
        with self._lock:
            self._forget_displays(image_id)
            return self._items.pop(image_id, None) is not None

    def expire(self) -> int:
        """Drop every entry idle for longer than ``idle_timeout_s``; how many were dropped."""
        now = self._clock()
        with self._lock:
            old = [k for k, e in self._items.items() if now - e.last_used > self.idle_timeout_s]
            for k in old:
                del self._items[k]
                self._forget_displays(k)
            self.expired += len(old)
            return len(old)

"""The server's settings: one frozen dataclass, filled from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medsam_rt.errors import ServeConfigError


@dataclass(frozen=True)
class ServeConfig:
    """How ``medsam-rt serve`` runs.

    Attributes:
        model_dir: the exported model directory.
        host, port: where to listen (127.0.0.1 by default: nothing outside this machine can connect).
        device, precision, threads: passed to :meth:`MedSAM.load` (precision fp32 by default: the page's in-browser
            decoder runs the fp32 decoder on the server's embedding, so both modes give the same masks).
        token: when set, every ``/v1/*`` and ``/metrics`` request needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest request body (413 above it).
        max_boxes: most boxes in one segment request.
        max_images: most images held; uploading one more drops the least recently used.
        idle_timeout_s: an image not used for this long is dropped.
        cache_bytes: the embedding cache's budget (embeddings of slices; least recently used dropped).
        workers: threads running model work (each runs ONNX Runtime with ``threads`` intra-op threads).
        max_queue: most model jobs running or waiting; more get 503 at once.
    """

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    token: str | None = None
    max_upload_bytes: int = 256 << 20
    max_boxes: int = 1024
    max_images: int = 64
    idle_timeout_s: float = 1800.0
    cache_bytes: int = 256 << 20
    workers: int = 1
    max_queue: int = 64

    def __post_init__(self) -> None:
        for name, low in (
            ("max_upload_bytes", 1),
            ("max_boxes", 1),
            ("max_images", 1),
            ("workers", 1),
            ("max_queue", 1),
            ("cache_bytes", 0),
        ):
            if int(getattr(self, name)) < low:
                raise ServeConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.idle_timeout_s > 0:
            raise ServeConfigError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if not 0 <= int(self.port) <= 65535:
            raise ServeConfigError(f"port must be 0..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ServeConfigError("token must not be empty")

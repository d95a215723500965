"""Small helpers shared by the runtime and the exporter."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, whitespace collapsed, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()

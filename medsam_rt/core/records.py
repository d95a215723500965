"""Small JSON records kept in the user's cache directory, safe when several processes write at once.

Two things are remembered between processes this way: graph files whose sha256 was verified (keyed by path and
file identity, :mod:`medsam_rt.core.manifest`) and the outcome of a precision variant's check on a CPU class
(:mod:`medsam_rt.core.checks`). Records are an optimisation: a file that cannot be read or written is ignored and the
work is simply done again. Writers take an advisory lock (``fcntl.flock`` where the platform has it), re-read the
file under it, merge, and replace it atomically, so concurrent loads neither corrupt the file nor drop each
other's records; readers never block.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere writes are still atomic, only a concurrent writer's record may be lost
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medsam-rt``, else ``~/.cache/medsam-rt``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsam-rt"


def record_path(env: str, name: str) -> Path | None:
    """Where a record file lives: ``$<env>`` if set (empty, ``off``, ``0`` or ``none``: nowhere, ``None``),
    else ``cache_dir() / name``."""
    value = os.environ.get(env)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value)
    return cache_dir() / name


def read_records(file: Path | None) -> dict[str, Any]:
    """The records in ``file`` (``{}`` when it is absent, unreadable or not a JSON object)."""
    if file is None:
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    with open(file.with_name(f".{file.name}.lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def put_record(file: Path | None, key: str, value: Any, limit: int = 256) -> None:
    """Set ``key`` in ``file`` (newest last, at most ``limit`` entries): lock, re-read, merge, replace atomically.
    Any failure is ignored: records are an optimisation."""
    if file is None:
        return
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(file):
            records = read_records(file)
            records.pop(key, None)
            records[key] = value
            items = list(records.items())[-limit:]
            fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(dict(items), fh)
            os.replace(tmp, file)
            tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


__all__ = ["cache_dir", "put_record", "read_records", "record_path"]

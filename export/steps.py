"""Time and peak memory of each step of an export (reported in the manifest and the export log)."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from typing import Any


def _peak_rss_mib() -> float | None:
    """This process's peak resident set since the last :func:`_reset_peak` (Linux ``VmHWM``), else ``None``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``/proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class StepLog:
    """Records ``{"step", "seconds", "peak_rss_mib"}`` per step; peak RSS is the step's own where Linux lets a
    process reset its mark, else the process's peak so far (``"peak_rss_scope": "process"``)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        own = _reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            peak = _peak_rss_mib()
            if peak is None:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row = {"step": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak)}
            if not own:
                row["peak_rss_scope"] = "process"
            self.steps.append(row)

    def total_seconds(self) -> float:
        return round(sum(s["seconds"] for s in self.steps), 2)

    def summary(self) -> str:
        """``"load 3.1 s (1.2 GiB), ..."``: one line for the export log."""
        return ", ".join(f"{s['step']} {s['seconds']:.0f} s ({s['peak_rss_mib'] / 1024:.1f} GiB)" for s in self.steps)

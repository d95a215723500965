"""Prometheus text metrics, kept in process (no client library): counters, histograms and gauges."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

#: Latency histogram buckets (seconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = [v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values]
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc, strict=True)) + "}"


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(BUCKETS):
            if value <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """The server's metrics; every method is thread-safe. :meth:`render` gives the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, ...], _Histogram] = {}
        self._stages: dict[tuple[str, ...], _Histogram] = {}
        self._counters: dict[str, int] = {}
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault((method, route), _Histogram()).observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        """Time of one model step (``embed``, ``segment``, ``labels``, ...) inside a request."""
        with self._lock:
            self._stages.setdefault((stage,), _Histogram()).observe(seconds)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A value read at each scrape."""
        self._gauges.append((name, help, read))

    def requests_total(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    def render(self, extra: Iterable[tuple[str, str, str, float]] = ()) -> str:
        """Prometheus text format 0.0.4. ``extra``: ``(name, type, help, value)`` rows to add."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP medsam_requests_total HTTP requests by method, route and status.",
                "# TYPE medsam_requests_total counter",
            ]
            for (m, r, s), n in sorted(self._requests.items()):
                out.append(f"medsam_requests_total{_labels(('method', 'route', 'status'), (m, r, s))} {n}")
            out += self._histograms(
                "medsam_request_seconds", "HTTP request latency.", ("method", "route"), self._latency
            )
            out += self._histograms(
                "medsam_stage_seconds", "Time of model steps inside requests.", ("stage",), self._stages
            )
            for name, n in sorted(self._counters.items()):
                out += [f"# TYPE medsam_{name}_total counter", f"medsam_{name}_total {n}"]
        for name, help, read in self._gauges:
            out += [f"# HELP medsam_{name} {help}", f"# TYPE medsam_{name} gauge", f"medsam_{name} {read():g}"]
        for name, kind, help, value in extra:
            out += [f"# HELP medsam_{name} {help}", f"# TYPE medsam_{name} {kind}", f"medsam_{name} {value:g}"]
        return "\n".join(out) + "\n"

    @staticmethod
    def _histograms(name: str, help: str, label_names: tuple[str, ...], data: dict) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for key, h in sorted(data.items()):
            for edge, n in zip(BUCKETS, h.counts, strict=True):
                out.append(f"{name}_bucket{_labels((*label_names, 'le'), (*key, f'{edge:g}'))} {n}")
            out.append(f"{name}_bucket{_labels((*label_names, 'le'), (*key, '+Inf'))} {h.total}")
            out.append(f"{name}_sum{_labels(label_names, key)} {h.sum:.6f}")
            out.append(f"{name}_count{_labels(label_names, key)} {h.total}")
        return out

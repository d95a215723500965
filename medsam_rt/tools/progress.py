"""A one-line progress bar on stderr, drawn only on a terminal (no dependency: tqdm's look, ~nothing of its code)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "slices") as bar: ... bar.update(note="slice 3")``.

    Draws ``label [#####.....] 3/10 00:04 note`` on ``stream`` when it is a TTY and ``enabled``; otherwise
    draws nothing (logs and CI output stay clean).
    """

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._note = ""
        self._width = 0

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done = min(self.done + n, self.total)
        self.set_note(note)

    def set_note(self, note: str | None) -> None:
        if note is not None:
            self._note = note
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = round(20 * self.done / self.total)
        elapsed = int(time.monotonic() - self._start)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
            f"{elapsed // 60:02d}:{elapsed % 60:02d} {self._note}"
        )
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

"""A progress bar on stderr for long commands, drawn only when stderr is a terminal (a script
or a pipe sees nothing of it), and redrawn at most every REDRAW_S."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TextIO

REDRAW_S = 0.1
WIDTH = 30


class Progress:
    """`with Progress("publishing", total, sys.stderr) as bar: bar.advance(n)`. With `total`
    None it shows the count and the time elapsed instead of a bar; `ticking` redraws from a
    thread while one long call runs (a purge), so the time keeps moving."""

    def __init__(self, label: str, total: int | None, stream: TextIO, ticking: bool = False):
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream
        self.shown = stream.isatty()
        self._started = time.monotonic()
        self._drawn_at = -REDRAW_S
        self._stop = threading.Event()
        self._ticker = (
            threading.Thread(target=self._tick, name="lionmq-progress", daemon=True)
            if ticking and self.shown
            else None
        )

    def __enter__(self) -> Progress:
        self._draw(force=True)
        if self._ticker is not None:
            self._ticker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.shown:  # wipe the bar: what the command prints next starts on a clean line
            self._stream.write("\r\033[K")
            self._stream.flush()

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_S):
            self._draw(force=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        if not self.total:
            count = f" {self.done}" if self.done else ""
            return f"{self.label}…{count} {elapsed:.1f}s"
        share = min(self.done / self.total, 1.0)
        full = round(share * WIDTH)
        bar = "#" * full + "-" * (WIDTH - full)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} {share:4.0%}  "
            f"{rate:.0f}/s  {elapsed:.1f}s"
        )

    def _draw(self, force: bool = False) -> None:
        if not self.shown:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_S and self.done != self.total:
            return
        self._drawn_at = now
        self._stream.write("\r\033[K" + self.line())
        self._stream.flush()

"""Progress of a long command: a live line with rate and ETA on a terminal, a plain line
every so often otherwise (a log file, a pipe, `systemd-run --pipe`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from agent.i18n import ENGLISH, Translator, duration


class Progress:
    def __init__(
        self,
        total: int,
        what: str = "lines",
        stream: TextIO | None = None,
        interactive: bool | None = None,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        translator: Translator | None = None,
    ) -> None:
        self._ = translator or Translator(ENGLISH)
        self.total = max(total, 0)
        self.what = what
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        # A terminal line is redrawn a few times a second; a log gets a line every `every` s.
        self.every = 0.2 if self.interactive else every
        self.clock = clock
        self.started = clock()
        self._last = self.started
        self._shown = False

    def line(self, done: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = done / elapsed
        parts = [f"{done:,}/{self.total:,} {self.what}"]
        if self.total:
            parts[0] += f" ({min(100, 100 * done // self.total)}%)"
        _ = self._
        parts.append(_("%(n)s/s") % {"n": f"{rate:,.0f}"})
        if rate > 0 and self.total > done:
            left = duration(_, (self.total - done) / rate)
            parts.append(_("ETA %(time)s") % {"time": left})
        return "  ".join(parts)

    def update(self, done: int) -> None:
        now = self.clock()
        if now - self._last < self.every:
            return
        self._last = now
        self._write(done)

    def finish(self, done: int) -> None:
        if self.interactive and self._shown:
            self._write(done)
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, done: int) -> None:
        self._shown = True
        if self.interactive:
            self.stream.write(f"\r  {self.line(done)}\x1b[K")
        else:
            self.stream.write(self._("progress: %(line)s") % {"line": self.line(done)} + "\n")
        self.stream.flush()

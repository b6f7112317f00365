"""A plain progress line on stderr: done / total, percent, rate, ETA. No dependency."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


class Progress:
    """Prints ``label: done/total records (pct) rate/s ETA h:mm:ss``.

    On a terminal the line is redrawn in place every ``every_s``; otherwise
    (a log file) one line is written every ``every_s * 20``. The rate counts
    only what this run read (a resumed run starts from ``done`` without
    claiming the earlier run's records as its speed).

    >>> import io
    >>> out = io.StringIO()
    >>> p = Progress("replay", 100, stream=out, every_s=0)
    >>> p.update(50); p.close(100)
    >>> "100/100 records (100.0%)" in out.getvalue()
    True
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        every_s: float = 0.5,
        enabled: bool = True,
        done: int = 0,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if self.tty else every_s * 20
        self.enabled = enabled
        self.started = time.monotonic()
        self.first = done
        self.last_print = 0.0

    def line(self, done: int) -> str:
        """The progress line for ``done`` records."""
        elapsed = time.monotonic() - self.started
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "?"
        return f"{self.label}: {done:,}/{self.total:,} records ({pct:.1f}%) {_rate(rate)} rec/s ETA {eta_text}"

    def update(self, done: int) -> None:
        """Show ``done`` if the last line is older than the interval."""
        now = time.monotonic()
        if not self.enabled or now - self.last_print < self.every_s:
            return
        self.last_print = now
        self._write(self.line(done))

    def close(self, done: int) -> None:
        """Show the final line."""
        if self.enabled:
            self._write(self.line(done))
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

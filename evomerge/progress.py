"""Progress of long steps, readable on a terminal and in a log.

On a terminal a rich bar with the elapsed time and an ETA; anywhere else (CI, ``ray job logs``,
``> log``) a plain line every ``interval`` seconds and at the end of each step, e.g.

    search 37/100  trial 41 complete · dev mean 0.488 · best 0.512  2.1/min  elapsed 0:17:40  ETA 0:30:00

The interval is ``EVOMERGE_PROGRESS_INTERVAL`` seconds (default 30).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

Update = Callable[[str, int, int], None]

__all__ = ["PlainProgress", "Update", "format_duration", "plain_interval"]


def format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plain_interval() -> float:
    raw = os.environ.get("EVOMERGE_PROGRESS_INTERVAL", "30")
    try:
        value = float(raw)
    except ValueError:
        return 30.0
    return value if value >= 0 else 30.0


class PlainProgress:
    """``update(label, done, total)`` that prints a plain line at most every ``interval`` seconds, on the
    first update and whenever a step completes (``done == total``). Rate and ETA come from the updates
    seen since the first one."""

    def __init__(
        self,
        description: str,
        out: IO[str],
        *,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = description
        self.out = out
        self.interval = interval
        self.clock = clock
        self.t0 = clock()
        self.first_done: int | None = None
        self.last_print: float | None = None
        self.last_line = ""

    def line(self, label: str, done: int, total: int) -> str:
        now = self.clock()
        elapsed = now - self.t0
        parts = [f"{self.description} {done}/{total}" if total else f"{self.description} {done}"]
        if label:
            parts.append(label)
        if self.first_done is not None and done > self.first_done and elapsed > 0:
            rate = (done - self.first_done) / elapsed
            parts.append(f"{rate * 60:.1f}/min")
            parts.append(f"elapsed {format_duration(elapsed)}")
            if total and done < total:
                parts.append(f"ETA {format_duration((total - done) / rate)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return "  ".join(parts)

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.first_done is None:
            self.first_done = done
            self.t0 = self.clock()
        now = self.clock()
        finished = bool(total) and done >= total
        due = self.last_print is None or now - self.last_print >= self.interval
        if due or finished:
            text = self.line(label, done, total)
            if text != self.last_line:
                print(text, file=self.out, flush=True)
                self.last_line = text
            self.last_print = now


@contextmanager
def plain_progress(description: str, out: IO[str], interval: float | None = None) -> Iterator[Update]:
    yield PlainProgress(description, out, interval=plain_interval() if interval is None else interval)

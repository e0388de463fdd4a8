"""Progress as log lines a person can read: at most one every few seconds, with rate and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def per_time(rate: float) -> str:
    """``12.5/s``, or ``3.2/min`` for a slow model (where ``0.0/s`` would say nothing)."""
    return f"{rate:.1f}/s" if rate >= 0.1 else f"{rate * 60:.1f}/min"


class ThrottledProgress:
    """A ``progress(done, total)`` callback that writes a line when the work ends and otherwise at
    most every ``every_s`` seconds, so a million calls make a few hundred log lines, not thousands,
    and a slow model still shows it is alive.

    A batched backend ends its calls in bursts (16 at once after 12 s): a line written at the first
    call of a burst would count one call for 12 s and promise an ETA many times too long. So a due
    line waits for the next call after a pause and reports the state at the end of the burst before
    it (a steady stream without pauses still gets a line every ``2 * every_s``)."""

    def __init__(
        self,
        label: str,
        write: Callable[[str], object],
        unit: str = "calls",
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        burst_s: float = 0.05,
    ):
        self.label, self.write, self.unit, self.every_s, self.clock = label, write, unit, every_s, clock
        self.burst_s = burst_s
        self.started = self.last = clock()
        self.previous = (self.started, 0)  # the time and count of the call before this one
        self.stream_started = self.started  # the first call after the latest pause

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        (before, done_before), self.previous = self.previous, (now, done)
        paused = now - before >= self.burst_s
        if paused:
            self.stream_started = now
        if done >= total:
            elapsed = now - self.started
            self.write(
                f"{self.label}: {done}/{total} {self.unit} done in {duration(elapsed)} ({self._rate(done, now)})"
            )
            self.started = self.last = now  # a session may run another pass (parse retries): timed from here
            self.previous = (now, 0)
        elif now - self.last >= self.every_s:
            if paused and done_before > 0:
                self._line(done_before, total, before, now)
            elif now - self.stream_started >= 2 * self.every_s:
                self._line(done, total, now, now)

    def _rate(self, done: int, at: float) -> str:
        return per_time(done / (at - self.started) if at > self.started else 0.0)

    def _line(self, done: int, total: int, at: float, now: float) -> None:
        elapsed = at - self.started
        eta = f"ETA {duration((total - done) * elapsed / done)}" if elapsed > 0 else "ETA unknown"
        self.write(f"{self.label}: {done}/{total} {self.unit} done ({self._rate(done, at)}, {eta})")
        self.last = now


class BlockProgress:
    """Progress of work done a block of rows at a time, on one ``progress(done, total)`` for the whole
    table: ``for_block(begin, size)`` is the callback a block's own work reports to (its calls or texts
    done, of its own total), mapped onto that block's rows; it never goes back (a parse-retry pass
    counts again from zero), and ``block_done`` reports the block's last row."""

    def __init__(self, progress: Callable[[int, int], None], rows: int):
        self.progress, self.rows, self.high, self.finished = progress, rows, 0, False

    def _report(self, value: int) -> None:
        """Forward progress, and the end once (a block's last call and ``block_done`` both reach it)."""
        if value > self.high or (value >= self.rows and not self.finished):
            self.high = max(self.high, value)
            self.finished = self.high >= self.rows
            self.progress(self.high, self.rows)

    def for_block(self, begin: int, size: int) -> Callable[[int, int], None]:
        return lambda done, of: self._report(begin + size * min(done, of) // max(of, 1))

    def block_done(self, begin: int, size: int) -> None:
        self._report(begin + size)

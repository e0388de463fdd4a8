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


class ThrottledProgress:
    """A ``progress(done, total)`` callback that writes a line when the work ends and otherwise at
    most every ``every_s`` seconds, so a million calls make a few hundred log lines, not thousands,
    and a slow model still shows it is alive."""

    def __init__(
        self,
        label: str,
        write: Callable[[str], object],
        unit: str = "calls",
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.write, self.unit, self.every_s, self.clock = label, write, unit, every_s, clock
        self.started = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if done >= total:
            self.write(f"{self.label}: {done}/{total} {self.unit} done in {duration(elapsed)} ({rate:.1f}/s)")
            self.started = now  # a session may run another pass (parse retries): it is timed from here
        else:
            eta = f"ETA {duration((total - done) / rate)}" if rate > 0 else "ETA unknown"
            self.write(f"{self.label}: {done}/{total} {self.unit} done ({rate:.1f}/s, {eta})")

"""Progress of the long stages on stderr: a tqdm bar in a terminal, a plain line every few seconds otherwise.

``progress(stage, total, unit)`` returns a counter: ``step(what)`` says which step now runs (and counts the one
before it as done), ``update(n)`` counts ``n`` units done, ``close()`` ends it; as a context manager it closes
itself. A ticker thread keeps it alive while one step runs long: it redraws the bar, or writes a plain line every
``PLAIN_EVERY_S`` seconds (``ttt: 3/12 steps (25%), now: sweep: 50 neighbours, 41 s, about 2 min left``), so a
stage is never silent for long. Whether anything is shown is decided once per run by ``set_progress``
(``--no-progress`` turns it off; by default a bar when stderr is a terminal, plain lines when it is not: a log
file, a batch job). Progress never goes to stdout, which holds the results.
"""

from __future__ import annotations

import sys
import threading
import time

PLAIN_EVERY_S = 5.0
"""Seconds between two plain progress lines when stderr is not a terminal."""
REDRAW_EVERY_S = 1.0
"""Seconds between two redraws of a terminal bar while a step runs."""

_enabled: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """``False``: no progress at all; ``True`` or ``None``: bars in a terminal, plain lines elsewhere."""
    global _enabled
    _enabled = enabled


def bars_wanted() -> bool:
    """Whether stages that draw their own tqdm bar (extraction, SAE training) should: in a terminal, unless off."""
    return _enabled is not False and sys.stderr.isatty()


class Progress:
    """A counter of ``total`` units of one stage, shown as the run's setting says (module docstring)."""

    def __init__(self, stage: str, total: int, unit: str = "steps", stream=None, ticker: bool = True):
        self.stage, self.total, self.unit = stage, max(int(total), 0), unit
        self.stream = stream or sys.stderr
        self.done, self.now = 0, None
        self.start = self.last = time.monotonic()
        self.bar = None
        self.shown = _enabled is not False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.shown and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=stage, unit=f" {unit}", file=self.stream, leave=False,
                            dynamic_ncols=True)
        if self.shown and ticker:
            threading.Thread(target=self._tick, name=f"progress-{stage}", daemon=True).start()

    def step(self, what: str) -> None:
        """``what`` runs now; the step before it (if any) is done."""
        self.update(1 if self.now is not None else 0, now=what)

    def update(self, n: int = 1, now: str | None = None) -> None:
        with self._lock:
            self.done += n
            if now is not None:
                self.now = now
            if not self.shown:
                return
            if self.bar is not None:
                if self.now:
                    self.bar.set_postfix_str(self.now, refresh=False)
                self.bar.update(n)
            elif time.monotonic() - self.last >= PLAIN_EVERY_S:
                self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def _tick(self) -> None:
        every = REDRAW_EVERY_S if self.bar is not None else PLAIN_EVERY_S
        while not self._stop.wait(every):
            with self._lock:
                if self._stop.is_set():
                    return
                if self.bar is not None:
                    self.bar.refresh()
                elif time.monotonic() - self.last >= PLAIN_EVERY_S:
                    self._write()

    def line(self) -> str:
        """``ttt: 3/12 steps (25%), now: sweep: 50 neighbours, 41 s, about 2 min left``."""
        elapsed = time.monotonic() - self.start
        share = self.done / self.total if self.total else 1.0
        text = f"{self.stage}: {self.done}/{self.total} {self.unit} ({100 * share:.0f}%)"
        text += f", now: {self.now}" if self.now and self.done < self.total else ""
        text += f", {_duration(elapsed)}"
        if 0 < share < 1:
            text += f", about {_duration(elapsed * (1 - share) / share)} left"
        return text

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            if self.now is not None and self.done < self.total:
                self.done += 1  # the last step ran to its end
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(stage: str, total: int, unit: str = "steps") -> Progress:
    return Progress(stage, total, unit)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

"""Progress lines: plain lines every few seconds when stderr is not a terminal, nothing with --no-progress."""

import io

import pytest

from analysis import progress as progress_module
from analysis.progress import Progress, set_progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", c)
    yield c
    set_progress(None)


def test_plain_lines_say_what_runs_now_and_the_time_left(clock):
    stream = io.StringIO()
    p = Progress("ttt", 4, stream=stream, ticker=False)
    p.step("main evaluation")  # at once: no line yet
    clock.now = 3.0
    p.step("locality")
    clock.now = 10.0
    p.step("sweeps")
    clock.now = 11.0
    p.update(0)  # one second later: still quiet
    assert stream.getvalue().splitlines() == ["ttt: 2/4 steps (50%), now: sweeps, 10 s, about 10 s left"]
    p.close()
    assert p.done == 3


def test_a_long_step_is_never_silent(monkeypatch):
    # The ticker writes while one step runs long (a real clock, short interval).
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.05)
    stream = io.StringIO()
    p = Progress("concepts", 2, stream=stream)
    p.step("probes and plots")
    import time

    time.sleep(0.3)
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all("now: probes and plots" in line for line in lines)


def test_no_progress_prints_nothing(clock):
    set_progress(False)
    stream = io.StringIO()
    p = Progress("concepts", 3, stream=stream)
    clock.now = 100.0
    p.step("a")
    p.close()
    assert stream.getvalue() == ""

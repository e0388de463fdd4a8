"""Progress lines: throttled to one every few seconds, always one at the end, with a rate and ETA."""

from srt_assets.core.progress import ThrottledProgress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_few_seconds_and_one_at_the_end():
    clock, lines = Clock(), []
    progress = ThrottledProgress("teacher (instruction)", lines.append, every_s=5, clock=clock)
    for done in range(1, 101):  # 100 calls over 25 seconds
        clock.now += 0.25
        progress(done, 100)
    assert len(lines) == 5  # at 5, 10, 15, 20 s and at the end, not 100 lines
    assert lines[0] == "teacher (instruction): 20/100 calls done (4.0/s, ETA 20s)"
    assert lines[-1] == "teacher (instruction): 100/100 calls done in 25s (4.0/s)"


def test_a_single_call_still_reports_its_end_and_durations_read_well():
    clock, lines = Clock(), []
    progress = ThrottledProgress("judge", lines.append, unit="calls", clock=clock)
    clock.now += 125
    progress(1, 1)
    assert lines == ["judge: 1/1 calls done in 2m05s (0.0/s)"]
    assert [duration(s) for s in (0.4, 59, 61, 3600 * 2 + 7 * 60)] == ["0s", "59s", "1m01s", "2h07m"]


def test_a_second_pass_of_the_same_session_is_timed_from_the_end_of_the_first():
    clock, lines = Clock(), []
    progress = ThrottledProgress("teacher", lines.append, clock=clock)
    clock.now += 60
    progress(4, 4)
    clock.now += 10
    progress(2, 2)  # the parse retries: 10 s, not 70
    assert lines[-1] == "teacher: 2/2 calls done in 10s (0.2/s)"

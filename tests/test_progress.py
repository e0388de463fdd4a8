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
    assert lines[0] == "teacher (instruction): 19/100 calls done (4.0/s, ETA 20s)"
    assert lines[-1] == "teacher (instruction): 100/100 calls done in 25s (4.0/s)"


def test_a_single_call_still_reports_its_end_and_durations_read_well():
    clock, lines = Clock(), []
    progress = ThrottledProgress("judge", lines.append, unit="calls", clock=clock)
    clock.now += 125
    progress(1, 1)
    assert lines == ["judge: 1/1 calls done in 2m05s (0.5/min)"]  # not "0.0/s"
    assert [duration(s) for s in (0.4, 59, 61, 3600 * 2 + 7 * 60)] == ["0s", "59s", "1m01s", "2h07m"]


def test_a_second_pass_of_the_same_session_is_timed_from_the_end_of_the_first():
    clock, lines = Clock(), []
    progress = ThrottledProgress("teacher", lines.append, clock=clock)
    clock.now += 60
    progress(4, 4)
    clock.now += 10
    progress(2, 2)  # the parse retries: 10 s, not 70
    assert lines[-1] == "teacher: 2/2 calls done in 10s (0.2/s)"


def test_the_first_call_of_a_burst_quotes_no_rate():
    """A batched teacher ends 16 calls at once after 12 s: the first of them alone would promise an
    ETA of 8 minutes for 40 calls; the next burst tells the true rate."""
    clock, lines = Clock(), []
    progress = ThrottledProgress("teacher", lines.append, clock=clock)
    for burst_end in (12, 24, 30):
        clock.now = 100 + burst_end
        for done in range(1 + (burst_end // 12 - 1) * 16, min(40, burst_end // 12 * 16) + 1):
            progress(done, 40)
    assert lines[0] == "teacher: 16/40 calls done (1.3/s, ETA 18s)"


def test_a_steady_stream_without_pauses_still_shows_progress():
    clock, lines = Clock(), []
    progress = ThrottledProgress("scores", lines.append, unit="texts", clock=clock)
    for done in range(1, 3001):  # 100 texts a second for 30 s, never a pause
        clock.now += 0.01
        progress(done, 3000)
    assert len(lines) == 5  # at 10, 15, 20, 25 s (once the stream has run 2 × every_s) and at the end
    assert lines[0].startswith("scores: 1000/3000 texts done (100.0/s, ETA 20s)")


def test_block_progress_maps_each_blocks_work_onto_the_whole_table_and_never_goes_back():
    from srt_assets.core.progress import BlockProgress

    seen = []
    blocks = BlockProgress(lambda done, total: seen.append((done, total)), rows=10)
    first = blocks.for_block(0, 4)
    first(1, 8), first(8, 8)  # a block's 8 calls: 4 rows
    first(1, 2)  # a parse-retry pass of 2 calls starts again from zero: no step back
    blocks.block_done(0, 4)
    second = blocks.for_block(4, 6)
    second(3, 6)
    blocks.block_done(4, 6)
    assert seen == [(4, 10), (7, 10), (10, 10)]

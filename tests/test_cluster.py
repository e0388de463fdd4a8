"""srt on a real cluster on this machine: a Dagster instance on PostgreSQL, Redis as Celery's broker,
two Celery workers as separate processes, all on 127.0.0.1 and stopped at the end. The commands
are the README's "Scaling out" ones. Simulated models: the scripted OpenAI-compatible teacher on
127.0.0.1 and the bundled student."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml
from conftest import REPO_ROOT, alpaca_rows, demo_ops, write_jsonl
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from openai_server import ScriptedOpenAIServer
from polars.testing import assert_frame_equal
from services import PostgresServer, RedisServer

pytestmark = pytest.mark.integration

MODEL_STEPS = {"new_instructions", "better_responses", "student_scores"}
SELECT_ALL = {"ops": {**demo_ops(), "sample_decisions": {"config": {"keep_unreflected": True, "ifd_below": 10.0}}}}


class Cluster:
    """The services, the environment every process of the cluster shares, and its workers."""

    def __init__(self, root: Path, postgres: PostgresServer, redis: RedisServer, teacher_url: str, student: Path):
        self.root, self.redis = root, redis
        home = root / "dagster_home"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text((REPO_ROOT / "configs" / "cluster" / "dagster.yaml").read_text())
        models = root / "models.yaml"
        models.write_text(yaml.safe_dump({
            "teacher": {"backend": "openai", "model": "scripted", "base_url": teacher_url, "concurrency": 1},
            "student": {"model": str(student)},
        }))  # fmt: skip
        (root / "run.yaml").write_text(yaml.safe_dump(SELECT_ALL))
        database = postgres.url.replace("postgresql://", "postgresql+psycopg2://", 1)
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "SRT_POSTGRES_URL": database,
            "SRT_CACHE_URL": database,
            "SRT_STORAGE_DIR": str(root / "store"),
            "SRT_MODELS_FILE": str(models),
            "SRT_EXECUTOR": "celery",
            "SRT_CELERY_BROKER": redis.url(0),
            "SRT_CELERY_LOST_AFTER_S": "6",
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: dict[str, subprocess.Popen] = {}
        self.seen_pids: dict[int, str] = {}  # pid -> worker name, for every process a worker had
        self.stopped = threading.Event()

    def start_worker(self, name: str) -> None:
        command = [sys.executable, "-m", "celery", "-A", "srt_assets.celery_cluster", "worker", "-Q", "gpu,dagster",
                   "--concurrency", "1", "--hostname", f"{name}@%h", "--loglevel", "INFO"]  # fmt: skip
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - the worker writes it until it stops
        self.workers[name] = subprocess.Popen(
            command, env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while "ready." not in (self.root / f"{name}.log").read_text():
            assert time.monotonic() < deadline and self.workers[name].poll() is None, self.worker_log(name)
            time.sleep(0.2)

    def worker_log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-3000:]

    def kill_worker(self, name: str) -> None:
        """kill -9 the worker and its pool processes at once: the machine died."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers.pop(name).wait(timeout=30)

    def record_worker_pids(self) -> None:
        """Note every process of every worker, ten times a second, until the cluster stops: each step
        runs in a pool process of its own (``worker_max_tasks_per_child=1``), gone when it ends."""

        def watch() -> None:
            while not self.stopped.wait(0.1):
                for name, process in list(self.workers.items()):
                    try:
                        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
                    except psutil.NoSuchProcess:
                        continue
                    self.seen_pids.update({member.pid: name for member in family})

        threading.Thread(target=watch, daemon=True).start()

    def use_catalog(self, rows: int, shards: int | None = None) -> None:
        """The sources file every process of the cluster reads (workers included)."""
        write_jsonl(self.root / "tiny.jsonl", alpaca_rows(rows, with_input=1))
        doc: dict = {"sources": {"tiny": {"path": "tiny.jsonl"}}, **({"shards": shards} if shards else {})}
        (self.root / "sources.yaml").write_text(yaml.safe_dump(doc))
        self.env["SRT_SOURCES_FILE"] = str(self.root / "sources.yaml")

    def srt(self, *args: str, wait: bool = True, timeout: float = 420):
        command = [
            sys.executable,
            "-m",
            "srt_assets.cli",
            "materialize",
            *args,
            "--config",
            str(self.root / "run.yaml"),
        ]
        if not wait:
            pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            return subprocess.Popen(command, env=self.env, cwd=REPO_ROOT, **pipe)
        return subprocess.run(command, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)

    def instance(self, monkeypatch) -> DagsterInstance:
        monkeypatch.setenv("SRT_POSTGRES_URL", self.env["SRT_POSTGRES_URL"])
        return DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def stop(self) -> None:
        self.stopped.set()
        for name in list(self.workers):
            self.kill_worker(name)


@pytest.fixture
def cluster(tmp_path, student_model_dir):
    with PostgresServer() as postgres, RedisServer() as redis, ScriptedOpenAIServer(latency=0.3) as teacher:
        running = Cluster(tmp_path, postgres, redis, teacher.base_url, student_model_dir)
        running.teacher, running.postgres = teacher, postgres
        try:
            yield running
        finally:
            running.stop()


def model_steps(instance: DagsterInstance) -> list[dict]:
    """Each model step of every run: where it ran (pid, Celery worker) and when."""
    steps = []
    for run in instance.get_runs():
        events = [record.dagster_event for record in instance.all_logs(run.run_id) if record.dagster_event]
        engine = [e.engine_event_data.metadata for e in events if e.event_type == DagsterEventType.ENGINE_EVENT]
        workers = {m["step_keys"].value: m["Celery worker"].value for m in engine if "Celery worker" in m}
        times = {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event and event.step_key in MODEL_STEPS and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
                times.setdefault(event.step_key, {})[event.event_type_value] = (record.timestamp, event.pid)
        for step, seen in times.items():
            start, pid = seen["STEP_START"]
            steps.append({"run": run.run_id, "step": step, "pid": pid, "worker": workers.get(step),
                          "start": start, "end": seen.get("STEP_SUCCESS", (float("inf"),))[0]})  # fmt: skip
    return steps


def test_a_sharded_source_runs_on_two_celery_workers_as_it_does_in_one_process(cluster, monkeypatch):
    cluster.use_catalog(6, shards=2)
    cluster.start_worker("gpu-1")
    cluster.start_worker("gpu-2")
    cluster.record_worker_pids()
    raw = cluster.srt("--source", "tiny", "--select", "raw_samples")
    assert raw.returncode == 0, raw.stdout + raw.stderr
    # two machines launch a shard each at the same moment: both want the single gpu slot (and, on a
    # fresh instance, both create the pool's limit: the second run used to fail at start)
    instance = cluster.instance(monkeypatch)
    launchers = [cluster.srt("--source", "tiny", "--shard", s, wait=False) for s in ("0", "1")]
    outputs = [launcher.communicate(timeout=420)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert any("waits for a slot of pool 'gpu'" in output for output in outputs), outputs  # they did contend
    merged = cluster.srt("--source", "tiny", "--select", "*sample_decisions", "--skip-shards")
    assert merged.returncode == 0, merged.stdout + merged.stderr

    steps = model_steps(instance)
    assert Counter(s["step"] for s in steps) == {step: 2 for step in MODEL_STEPS}  # once per shard
    worker_pids = cluster.seen_pids
    launcher_pids = {launcher.pid for launcher in launchers}
    for step in steps:  # each ran in a worker's pool process, not in a launching process
        assert step["pid"] in worker_pids and step["pid"] not in launcher_pids, step
        assert step["worker"].split("@")[0] == worker_pids[step["pid"]], step
    ordered = sorted(steps, key=lambda s: s["start"])
    for before, after in itertools.pairwise(ordered):  # one gpu slot: never two model steps at once
        assert before["end"] <= after["start"], (before, after)
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots

    # the same source in one process (default executor, its own storage and SQLite cache)
    local = {**cluster.env, "SRT_EXECUTOR": "", "SRT_CACHE_URL": "", "SRT_STORAGE_DIR": str(cluster.root / "local"),
             "DAGSTER_HOME": str(cluster.root / "local_home")}  # fmt: skip
    (cluster.root / "local_home").mkdir()
    command = [sys.executable, "-m", "srt_assets.cli", "materialize", "--source", "tiny", "--select",
               "*sample_decisions", "--config", str(cluster.root / "run.yaml")]  # fmt: skip
    alone = subprocess.run(command, env=local, cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    on_cluster = pl.read_parquet(cluster.root / "store" / "sample_decisions" / "tiny.parquet").sort("sample_id")
    in_process = pl.read_parquet(cluster.root / "local" / "sample_decisions" / "tiny.parquet").sort("sample_id")
    raw_rows = pl.read_parquet(cluster.root / "store" / "raw_samples" / "tiny.parquet").height
    assert on_cluster.height == raw_rows >= 6
    # the same decisions; the float32 scores behind them agree to the engine's stated exactness (1e-4 on a
    # perplexity; seen in CI: 4e-5 on an IFD, a ratio of two), as each process reduces in its own order
    assert_frame_equal(on_cluster, in_process, check_exact=False, rel_tol=1e-3)  # other columns: exact

    # a rerun on the cluster asks no model anything: every call is in the shared cache
    calls = cluster.teacher.requests
    again = cluster.srt("--source", "tiny", "--select", "*sample_decisions")
    assert again.returncode == 0, again.stdout + again.stderr
    assert cluster.teacher.requests == calls
    from conftest import latest_metadata

    assert latest_metadata(instance, "new_instructions")["calls_made"] == 0
    assert latest_metadata(instance, "better_responses")["calls_made"] == 0
    assert latest_metadata(instance, "student_scores")["texts_computed"] == 0


def teacher_calls_stored(cluster: Cluster) -> int:
    import psycopg2

    with psycopg2.connect(cluster.postgres.url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM srt_cache.teacher_calls")
        return cursor.fetchone()[0]


def latest_step_events(instance: DagsterInstance, step_key: str, event_type: DagsterEventType) -> list:
    """The events of ``event_type`` for ``step_key`` in the newest run."""
    return [
        record.dagster_event
        for run in instance.get_runs(limit=1)
        for record in instance.all_logs(run.run_id, of_type=event_type)
        if record.dagster_event.step_key == step_key
    ]


def step_worker(instance: DagsterInstance, step_key: str) -> str | None:
    for event in latest_step_events(instance, step_key, DagsterEventType.ENGINE_EVENT):
        metadata = event.engine_event_data.metadata
        if "Celery worker" in metadata:
            return metadata["Celery worker"].value.split("@")[0]
    return None


def running_step_pid(instance: DagsterInstance, step_key: str) -> int | None:
    return next((event.pid for event in latest_step_events(instance, step_key, DagsterEventType.STEP_START)), None)


@pytest.mark.parametrize("kill", ["worker", "pool_process"])
def test_a_worker_killed_mid_step_fails_the_run_frees_its_slot_and_the_rerun_reuses_its_calls(
    cluster, monkeypatch, kill
):
    """``worker``: the machine died (the worker and its pool process at once; nobody reports). ``pool_process``:
    the process running the step was killed (the kernel's OOM killer); the worker lives and tells Celery."""
    cluster.use_catalog(8)
    cluster.start_worker("gpu-1")
    cluster.start_worker("gpu-2")
    instance = cluster.instance(monkeypatch)
    args = ("--source", "tiny", "--select", "+new_instructions")
    first = cluster.srt(*args, wait=False)
    deadline = time.monotonic() + 240
    while cluster.teacher.requests < 3 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    victim, pid = step_worker(instance, "new_instructions"), running_step_pid(instance, "new_instructions")
    assert victim and pid and cluster.teacher.requests >= 3, first.stdout.read() if first.poll() is not None else victim
    if kill == "worker":
        cluster.kill_worker(victim)  # in the middle of the teacher's calls, one per row
    else:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = first.communicate(timeout=120)
    assert first.returncode != 0, output  # the run ended failed, it did not wait for ever
    assert time.monotonic() - killed_at < 60
    if kill == "worker":
        assert f"Celery worker {victim}@" in output and "stopped answering" in output, output[-3000:]
    else:
        assert "ended without reporting: WorkerLostError" in output, output[-3000:]
    (dead,) = [run for run in instance.get_runs() if run.status != DagsterRunStatus.SUCCESS]
    assert dead.status == DagsterRunStatus.FAILURE
    (failure,) = instance.all_logs(dead.run_id, of_type=DagsterEventType.STEP_FAILURE)
    assert failure.dagster_event.step_key == "new_instructions"  # the step failed, it is not left running
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # its slot is free again

    rows = pl.read_parquet(cluster.root / "store" / "raw_samples" / "tiny.parquet").height
    stored, before = teacher_calls_stored(cluster), cluster.teacher.requests
    assert 2 <= stored < rows  # the calls finished before the kill
    second = cluster.srt(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert cluster.teacher.requests - before == rows - stored  # no finished call is made again
    if kill == "worker":
        assert step_worker(instance, "new_instructions") == next(iter(cluster.workers))  # the remaining worker


def test_a_broker_that_dies_and_comes_back_ends_the_run_in_flight_and_the_rerun_finishes(cluster, monkeypatch):
    cluster.use_catalog(8)
    cluster.start_worker("gpu-1")
    args = ("--source", "tiny", "--select", "+new_instructions")
    first = cluster.srt(*args, wait=False)
    deadline = time.monotonic() + 240
    while cluster.teacher.requests < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    cluster.redis.kill()
    time.sleep(2)
    cluster.redis.start()  # back, and empty: queued tasks and stored results are gone
    output, _ = first.communicate(timeout=180)  # ended, one way or the other, not wedged
    instance = cluster.instance(monkeypatch)
    (run,) = instance.get_runs()
    assert run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS), output
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    second = cluster.srt(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (
        teacher_calls_stored(cluster) == pl.read_parquet(cluster.root / "store" / "raw_samples" / "tiny.parquet").height
    )


def test_ctrl_c_stops_the_run_and_the_step_on_its_worker(cluster, monkeypatch):
    cluster.use_catalog(12)
    cluster.start_worker("gpu-1")
    first = cluster.srt("--source", "tiny", "--select", "+new_instructions", wait=False)
    deadline = time.monotonic() + 240
    while cluster.teacher.requests < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=60)  # it stops now, not when the step would have ended
    assert first.returncode != 0, output
    time.sleep(2)
    calls = cluster.teacher.requests
    time.sleep(3)
    assert cluster.teacher.requests == calls  # the step no longer runs on the worker
    rows = pl.read_parquet(cluster.root / "store" / "raw_samples" / "tiny.parquet").height
    assert calls < rows
    instance = cluster.instance(monkeypatch)
    (run,) = instance.get_runs()
    assert run.status in (DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE)
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots


def write_share(url: str, worker: int, keys: int, results) -> None:
    from srt_assets.core.cache import open_cache

    cache = open_cache(url, "teacher_calls")
    for start in range(0, keys, 25):  # overlapping chunks: both workers write every key
        cache.put_many({f"k{i}": {"reply": f"r{i}", "by": worker} for i in range(start, start + 25)})
    results.put(len(cache))
    cache.close()


def test_two_workers_writing_the_shared_cache_at_once_lose_nothing():
    from srt_assets.core.cache import open_cache
    from srt_assets.core.generation import CachedGenerator, Generation, GenerationParams

    with PostgresServer() as postgres:
        url = postgres.url.replace("postgresql://", "postgresql+psycopg2://", 1)
        results = multiprocessing.get_context("spawn").Queue()
        writers = [multiprocessing.get_context("spawn").Process(target=write_share, args=(url, n, 2000, results))
                   for n in (1, 2)]  # fmt: skip
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=120)
        assert [writer.exitcode for writer in writers] == [0, 0]
        cache = open_cache(url, "teacher_calls")
        stored = cache.get_many(f"k{i}" for i in range(2000))
        assert len(stored) == len(cache) == 2000
        assert all(value["reply"] == f"r{int(key[1:])}" for key, value in stored.items())

        # the same rule as on one machine: an unusable reply is not stored, so a rerun asks again
        class Backend:
            model_id, calls = "m", 0

            def generate(self, conversations, params, on_done=None):
                Backend.calls += len(conversations)
                return [Generation(text=None, error="no", error_kind="unusable_reply") if "bad" in c[-1]["content"]
                        else Generation(text="fine") for c in conversations]  # fmt: skip

        generator = CachedGenerator(Backend(), open_cache(url, "unusable_rule"))
        conversations = [[{"role": "user", "content": text}] for text in ("good", "bad")]
        generator.generate(conversations, GenerationParams())
        generator.generate(conversations, GenerationParams())
        assert Backend.calls == 3  # "good" once, "bad" twice

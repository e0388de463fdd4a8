"""The real Dagster UI (`dagster dev`: webserver and daemon) on 127.0.0.1 with the project's
workspace.yaml and dagster.yaml: the code location loads, every asset and check is listed with its
partitions, and a materialization launched through GraphQL succeeds with its checks evaluated."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO_ROOT, alpaca_rows, write_jsonl

from srt_assets.assets.reflection import SMALL_TEACHER_PROMPTS
from srt_assets.core.sharding import shard_of


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def dagster_dev(tmp_path: Path, **extra_env: str) -> Iterator[int]:
    """`dagster dev` (webserver and daemon) with the project's workspace.yaml and a copy of its
    dagster.yaml in a fresh DAGSTER_HOME; yields the port once the server answers."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SRT_STORAGE_DIR": str(tmp_path / "data"), **extra_env}
    dagster_bin = Path(sys.executable).parent / "dagster"
    log = (tmp_path / "webserver.log").open("w")
    process = subprocess.Popen(
        [str(dagster_bin), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "webserver.log").read_text()) from None
                time.sleep(1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[int]:
    with dagster_dev(tmp_path) as port:
        yield port


EXPECTED_ASSETS = {
    "raw_samples",
    "raw_rejects",
    "instruction_candidates",
    "response_candidates",
    "student_base_model",
    "student_scores",
    "selection_decisions",
    "selected_dataset",
    "baseline_random",
    "baseline_full",
    "finetuned_checkpoint/selected",
    "finetuned_checkpoint/random",
    "finetuned_checkpoint/full",
    "evaluation_prompts",
    "evaluation_answers",
    "reference_answer_loss",
    "pairwise_judgements",
    "experiment_report",
}
UNPARTITIONED = {"student_base_model", "evaluation_prompts"}
LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL = """
mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
BACKFILL_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status } } }"""
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
CHECK_RESULTS = """
query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { assetKey { path }
  assetChecksOrError { ... on AssetChecks { checks { name
    executionForLatestMaterialization { status evaluation { success } } } } } } }"""


def wait_for_location(port: int) -> dict:
    deadline = time.monotonic() + 120
    while True:  # the code location loads in a subprocess after the server answers
        data = graphql(
            port,
            """
            { workspaceOrError { ... on Workspace { locationEntries {
                name locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
        )
        entries = data["data"]["workspaceOrError"]["locationEntries"]
        status = entries[0]["locationOrLoadError"]
        if (status and status["__typename"] == "RepositoryLocation") or time.monotonic() > deadline:
            return entries[0]
        time.sleep(1)


def poll(port: int, query: str, variables: dict, status_of, done: set[str], timeout_s: float) -> str | None:
    """Ask ``query`` every two seconds until the status it reports is in ``done`` or time is up."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = status_of(graphql(port, query, variables)["data"])
        if status in done:
            break
        time.sleep(2)
    return status


def run_raw_partition(port: int, partition: str) -> str | None:
    """Launch raw_samples and raw_rejects of one source partition, as the UI's Materialize does."""
    params = {
        "selector": {
            "repositoryLocationName": "srt_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": ["raw_samples"]}, {"path": ["raw_rejects"]}],
        },
        "runConfigData": {},
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }
    launched = graphql(port, LAUNCH, {"params": params})["data"]["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    variables = {"id": launched["run"]["runId"]}
    return poll(port, RUN_STATUS, variables, lambda d: d["runOrError"]["status"], RUN_DONE, 240)


def test_ui_lists_everything_and_runs_a_partition(webserver: int):
    entry = wait_for_location(webserver)
    assert entry["name"] == "srt_assets"
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
    nodes = graphql(
        webserver,
        """
        { assetNodes { assetKey { path } partitionKeys
            assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }""",
    )["data"]["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == EXPECTED_ASSETS
    for name in EXPECTED_ASSETS - UNPARTITIONED:
        assert {"demo", "alpaca", "alpaca_cherry5", "wizardlm"} <= set(by_key[name]["partitionKeys"]), name
    checks = {
        (name, c["name"]): c["blocking"] for name, node in by_key.items() for c in node["assetChecksOrError"]["checks"]
    }
    assert len(checks) == 18 and all(checks.values())  # every check blocks bad data
    assert checks[("raw_samples", "sample_id_unique")] and checks[("selected_dataset", "traces_to_one_raw_row")]

    assert run_raw_partition(webserver, "demo") == "SUCCESS"
    results = graphql(webserver, CHECK_RESULTS, {"keys": [{"path": ["raw_samples"]}]})["data"]["assetNodes"]
    executions = {c["name"]: c["executionForLatestMaterialization"] for c in results[0]["assetChecksOrError"]["checks"]}
    assert len(executions) == 5
    assert all(e["status"] == "SUCCEEDED" and e["evaluation"]["success"] for e in executions.values()), executions


@pytest.mark.shared_data
def test_ui_backfills_the_shards_of_a_source(tmp_path: Path):
    """With ``shards: 2`` the UI shows the row stages as a source x shard grid, and a backfill of
    one source's shards (what a user launches from the grid) runs one run per shard through the
    daemon, each writing its own file with its own rows."""
    write_jsonl(tmp_path / "tiny.jsonl", alpaca_rows(3, with_input=1))
    catalog = tmp_path / "sources.yaml"
    catalog.write_text("shards: 2\nsources:\n  tiny:\n    path: tiny.jsonl\n", encoding="utf-8")
    with dagster_dev(tmp_path, SRT_SOURCES_FILE=str(catalog)) as port:
        assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        nodes = graphql(port, "{ assetNodes { assetKey { path } partitionKeys } }")["data"]["assetNodes"]
        partitions = {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in nodes}
        for name in ("instruction_candidates", "response_candidates", "student_scores"):
            assert partitions[name] == ["tiny|0", "tiny|1"], name
        assert partitions["raw_samples"] == partitions["selection_decisions"] == ["tiny"]

        assert run_raw_partition(port, "tiny") == "SUCCESS"
        params = {
            "assetSelection": [{"path": ["instruction_candidates"]}],
            "partitionNames": ["tiny|0", "tiny|1"],
            "title": "tiny shards",
            # a short teacher reply keeps the test quick; the launchpad accepts the same resource config
            "runConfigData": {
                "resources": {"teacher": {"config": {"max_tokens": 16, "prompts_file": str(SMALL_TEACHER_PROMPTS)}}}
            },
        }
        launched = graphql(port, BACKFILL, {"params": params})["data"]["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        variables = {"id": launched["backfillId"]}
        status = poll(
            port, BACKFILL_STATUS, variables, lambda d: d["partitionBackfillOrError"]["status"], BACKFILL_DONE, 480
        )
        assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, (tmp_path / "webserver.log").read_text()[-3000:])

    raw = pl.read_parquet(tmp_path / "data" / "raw_samples" / "tiny.parquet")
    shards = [pl.read_parquet(tmp_path / "data" / "instruction_candidates" / "tiny" / f"{k}.parquet") for k in (0, 1)]
    assert sorted(shards[0]["sample_id"].to_list() + shards[1]["sample_id"].to_list()) == sorted(raw["sample_id"])
    for index, shard in enumerate(shards):
        assert all(shard_of(sample, 2) == index for sample in shard["sample_id"])

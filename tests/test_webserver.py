"""The real Dagster UI (`dagster dev`: webserver and daemon) on 127.0.0.1 with the project's
workspace.yaml and dagster.yaml: the code location loads, every asset and check is listed with its
partitions, and a materialization launched through GraphQL succeeds with its checks evaluated."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT


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


@pytest.fixture
def webserver(tmp_path: Path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SRT_STORAGE_DIR": str(tmp_path / "data")}
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

    raw = [{"path": ["raw_samples"]}, {"path": ["raw_rejects"]}]
    params = {
        "selector": {
            "repositoryLocationName": "srt_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": raw,
        },
        "runConfigData": {},
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "demo"}]},
    }
    launched = graphql(webserver, LAUNCH, {"params": params})["data"]["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = graphql(webserver, RUN_STATUS, {"id": run_id})["data"]["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS"
    results = graphql(webserver, CHECK_RESULTS, {"keys": [{"path": ["raw_samples"]}]})["data"]["assetNodes"]
    executions = {c["name"]: c["executionForLatestMaterialization"] for c in results[0]["assetChecksOrError"]["checks"]}
    assert len(executions) == 5
    assert all(e["status"] == "SUCCEEDED" and e["evaluation"]["success"] for e in executions.values()), executions

"""Helpers for tests against the real Dagster UI: `dagster dev` (webserver and daemon) on 127.0.0.1
with the project's workspace.yaml and dagster.yaml in a fresh DAGSTER_HOME, and its GraphQL API."""

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
MATERIALIZATION_METADATA = """
query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { assetMaterializations(limit: 1) {
  metadataEntries { label ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
    ... on BoolMetadataEntry { boolValue } } } } }"""
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
    return run_partition(port, partition, ["raw_samples", "raw_rejects"])


def run_partition(port: int, partition: str, assets: list[str], timeout_s: float = 600) -> str | None:
    """Launch ``assets`` of one source partition, as the UI's Materialize does; wait for the end."""
    params = {
        "selector": {
            "repositoryLocationName": "srt_assets",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [name]} for name in assets],
        },
        "runConfigData": {},
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }
    launched = graphql(port, LAUNCH, {"params": params})["data"]["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    variables = {"id": launched["run"]["runId"]}
    return poll(port, RUN_STATUS, variables, lambda d: d["runOrError"]["status"], RUN_DONE, timeout_s)

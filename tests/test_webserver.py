"""The real Dagster webserver loads the code location from workspace.yaml and lists the assets."""

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


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
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
    webserver_bin = Path(sys.executable).parent / "dagster-webserver"
    log = (tmp_path / "webserver.log").open("w")
    process = subprocess.Popen(
        [str(webserver_bin), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
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
        process.wait(timeout=30)
        log.close()


def test_webserver_lists_assets_checks_and_partitions(webserver: int):
    deadline = time.monotonic() + 60
    while True:  # the code location loads in a subprocess after the server answers
        data = graphql(
            webserver,
            """
            { workspaceOrError { ... on Workspace { locationEntries {
                name locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
        )
        entries = data["data"]["workspaceOrError"]["locationEntries"]
        status = entries[0]["locationOrLoadError"]
        if (status and status["__typename"] == "RepositoryLocation") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert entries[0]["name"] == "srt_assets"
    assert status["__typename"] == "RepositoryLocation", status
    nodes = graphql(
        webserver,
        """
        { assetNodes { assetKey { path } partitionKeys
            assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }""",
    )["data"]["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert {"raw_samples", "raw_rejects"} <= set(by_key)
    assert {"demo", "alpaca", "alpaca_cherry5", "wizardlm"} <= set(by_key["raw_samples"]["partitionKeys"])
    checks = {c["name"]: c["blocking"] for c in by_key["raw_samples"]["assetChecksOrError"]["checks"]}
    assert checks["sample_id_unique"] is True and checks["reject_ratio_below_bound"] is True

"""The real Dagster UI (`dagster dev`: webserver and daemon) on 127.0.0.1 with the project's
workspace.yaml and dagster.yaml: the code location loads, every asset and check is listed with its
partitions, and a materialization launched through GraphQL succeeds with its checks evaluated."""

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import alpaca_rows, write_jsonl
from dagster_ui import (
    BACKFILL,
    BACKFILL_DONE,
    BACKFILL_STATUS,
    CHECK_RESULTS,
    dagster_dev,
    graphql,
    poll,
    run_raw_partition,
    wait_for_location,
)
from test_asset_graph import SNAPSHOT

from srt_assets.core.sharding import shard_of
from srt_assets.models.chat_model import SMALL_TEACHER_PROMPTS


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[int]:
    with dagster_dev(tmp_path) as port:
        yield port


EXPECTED_ASSETS = set(json.loads(SNAPSHOT.read_text())["assets"])
UNPARTITIONED = {"student_base_model", "evaluation_prompts"}


@pytest.mark.integration
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
    assert len(checks) == 24 and sum(checks.values()) == 19  # every data check blocks; the result checks warn
    assert not checks[("reference_loss", "selected_beats_random")]
    assert checks[("raw_samples", "sample_id_unique")] and checks[("selected_dataset", "traces_to_one_raw_row")]

    assert run_raw_partition(webserver, "demo") == "SUCCESS"
    results = graphql(webserver, CHECK_RESULTS, {"keys": [{"path": ["raw_samples"]}]})["data"]["assetNodes"]
    executions = {c["name"]: c["executionForLatestMaterialization"] for c in results[0]["assetChecksOrError"]["checks"]}
    assert len(executions) == 5
    assert all(e["status"] == "SUCCEEDED" and e["evaluation"]["success"] for e in executions.values()), executions


@pytest.mark.integration
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
        for name in ("new_instructions", "better_responses", "student_scores"):
            assert partitions[name] == ["tiny|0", "tiny|1"], name
        assert partitions["raw_samples"] == partitions["sample_decisions"] == ["tiny"]

        assert run_raw_partition(port, "tiny") == "SUCCESS"
        params = {
            "assetSelection": [{"path": ["new_instructions"]}],
            "partitionNames": ["tiny|0", "tiny|1"],
            "title": "tiny shards",
            # a short teacher reply keeps the test quick; the launchpad accepts the same resource config
            "runConfigData": {
                "ops": {"new_instructions": {"config": {"max_failure_ratio": 1.0}}},  # the 135M teacher (demo.yaml)
                "resources": {"teacher": {"config": {"max_tokens": 16, "prompts_file": str(SMALL_TEACHER_PROMPTS)}}},
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
    shards = [pl.read_parquet(tmp_path / "data" / "new_instructions" / "tiny" / f"{k}.parquet") for k in (0, 1)]
    assert sorted(shards[0]["sample_id"].to_list() + shards[1]["sample_id"].to_list()) == sorted(raw["sample_id"])
    for index, shard in enumerate(shards):
        assert all(shard_of(sample, 2) == index for sample in shard["sample_id"])

"""Sharding one source (catalog ``shards: N``): the row-wise model stages become source x shard
partitions that can run on several GPUs or machines, and the per-source stages after them see
exactly the rows, teacher calls and scores an unsharded run would produce."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import alpaca_rows, demo_ops, latest_metadata, write_jsonl
from dagster import AssetKey, DagsterInstance

from srt_assets.cli import materialize_partition, plan_partition_runs
from srt_assets.core.sharding import shard_of, take_shard
from srt_assets.core.sources import SourceConfigError, load_catalog
from srt_assets.definitions import build_definitions
from srt_assets.models.chat_model import SMALL_TEACHER_PROMPTS
from srt_assets.resources import StudentModelResource, TransformersChatResource

ROW_STAGES = ("new_instructions", "better_responses", "student_scores")
SELECT_ALL = {"ops": {**demo_ops(), "sample_decisions": {"config": {"keep_unreflected": True, "ifd_below": 10.0}}}}


def sharded_catalog(directory: Path, data: str, shards: int | None) -> Path:
    doc: dict = {"sources": {"tiny": {"path": data}}}
    if shards is not None:
        doc["shards"] = shards
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sources.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_shards_are_stable_disjoint_complete_and_balanced():
    ids = [f"alpaca-{index:06d}-{index * 7919 % 10007:x}" for index in range(600)]
    frame = pl.DataFrame({"sample_id": ids, "row_index": range(600)})
    parts = [take_shard(frame, shard, 3) for shard in range(3)]
    assert sorted(id_ for part in parts for id_ in part["sample_id"]) == sorted(ids)
    assert sum(part.height for part in parts) == frame.height
    for part in parts:
        assert 150 <= part.height <= 250  # 200 expected per shard
        assert part["row_index"].is_sorted()  # rows keep their source order
    # the shard of a sample depends on its id only: not on its position or the other rows
    assert [shard_of(i, 3) for i in ids[::-1]] == [shard_of(i, 3) for i in ids][::-1]
    assert take_shard(frame.tail(10), 1, 3)["sample_id"].to_list() == [i for i in ids[-10:] if shard_of(i, 3) == 1]
    assert take_shard(frame, 0, 1).equals(frame)
    with pytest.raises(ValueError, match=r"shard 3 is not one of 0\.\.2"):
        take_shard(frame, 3, 3)


@pytest.mark.parametrize("bad", [0, -1, "2", True, 2.5])
def test_catalog_rejects_a_bad_shard_count(tmp_path, bad):
    path = sharded_catalog(tmp_path, "x.jsonl", bad)
    with pytest.raises(SourceConfigError, match=r"sources\.yaml: 'shards' must be an integer"):
        load_catalog(path)


def test_run_plan_puts_shards_between_the_per_source_stages(tmp_path):
    defs = build_definitions(sources_file=sharded_catalog(tmp_path, "x.jsonl", 3), storage_dir=tmp_path / "s")
    graph = defs.resolve_asset_graph()
    for name in ROW_STAGES:
        keys = graph.get(AssetKey(name)).partitions_def.get_partition_keys()
        assert [str(k) for k in keys] == ["tiny|0", "tiny|1", "tiny|2"]
    assert graph.get(AssetKey("sample_decisions")).partitions_def.get_partition_keys() == ["tiny"]

    runs = plan_partition_runs(graph, graph.materializable_asset_keys, "tiny")
    partitions = [partition for partition, _ in runs]
    assert partitions == ["tiny", "tiny|0", "tiny|1", "tiny|2", "tiny"]
    first, *shards, last = [{k.to_user_string() for k in keys} for _, keys in runs]
    assert "raw_samples" in first and "sample_decisions" in last and "experiment_report" in last
    assert all(names == set(ROW_STAGES) for names in shards)
    assert plan_partition_runs(graph, graph.materializable_asset_keys, "tiny", shard=2) == [
        ("tiny|2", sorted(AssetKey(n) for n in ROW_STAGES))
    ]
    (merged,) = plan_partition_runs(graph, graph.materializable_asset_keys, "tiny", skip_shards=True)
    assert merged[0] == "tiny" and {k.to_user_string() for k in merged[1]} == first | last
    with pytest.raises(SystemExit, match="no shard 5"):
        plan_partition_runs(graph, graph.materializable_asset_keys, "tiny", shard=5)

    plain = build_definitions(sources_file=sharded_catalog(tmp_path / "plain", "x.jsonl", None)).resolve_asset_graph()
    assert [p for p, _ in plan_partition_runs(plain, plain.materializable_asset_keys, "tiny")] == ["tiny"]
    with pytest.raises(SystemExit, match="--shard/--skip-shards need a sharded catalog"):
        plan_partition_runs(plain, plain.materializable_asset_keys, "tiny", shard=0)


@pytest.mark.slow
def test_sharded_run_equals_the_unsharded_work(tmp_path, student_model_dir, monkeypatch):
    """Two shards with the real models, then the same source unsharded over the same storage:
    every teacher call and student loss it needs is already cached by the shards, and the
    decisions are identical. Shard 1 first runs as on a second machine, with its own local cache."""
    write_jsonl(tmp_path / "tiny.jsonl", alpaca_rows(4, with_input=1))
    model = str(student_model_dir)
    resources = {
        "student": StudentModelResource(model=model),
        "teacher": TransformersChatResource(
            model=model, max_tokens=24, batch_size=8, parse_retries=0, prompts_file=str(SMALL_TEACHER_PROMPTS)
        ),
    }
    store = tmp_path / "store"
    sharded_file = sharded_catalog(tmp_path, "tiny.jsonl", 2)
    sharded = build_definitions(sources_file=sharded_file, storage_dir=store, resources=resources)
    instance = DagsterInstance.ephemeral(tempdir=str(tmp_path / "home"))

    def run(defs, selection, shard=None):
        results = materialize_partition(
            "tiny", selection, run_config=SELECT_ALL, shard=shard, defs=defs, instance=instance
        )
        return results

    # one machine's part: raw, then shard 1 only on "machine 2", whose cache is on its local disk
    assert all(r.success for r in run(sharded, "raw_samples"))
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path / "machine2"))
    machine2 = build_definitions(sources_file=sharded_file, storage_dir=store, resources=resources)
    monkeypatch.delenv("SRT_CACHE_DIR")
    assert all(r.success for r in run(machine2, None, shard=1))
    assert (tmp_path / "machine2" / "model_calls.sqlite").is_file()
    assert not (store / "cache" / "model_calls.sqlite").exists()
    # the per-source stage refuses to run on half a source, naming what is missing
    (blocked,) = run(sharded, "sample_decisions")
    assert not blocked.success
    failure = next(e for e in blocked.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    message += failure.step_failure_data.error.message
    assert any(stage in message for stage in ROW_STAGES) and "tiny|0" in message and "tiny|1" not in message

    # machine 1 runs shard 0, then the per-source stages over both machines' shard files
    assert all(r.success for r in run(sharded, None, shard=0))
    results = materialize_partition(
        "tiny", "*sample_decisions", run_config=SELECT_ALL, skip_shards=True, defs=sharded, instance=instance
    )
    assert [r.dagster_run.tags["dagster/partition"] for r in results] == ["tiny"]
    assert all(r.success for r in results)
    raw = pl.read_parquet(store / "raw_samples" / "tiny.parquet")
    shard_rows = {shard: pl.read_parquet(store / "new_instructions" / "tiny" / f"{shard}.parquet") for shard in "01"}
    assert sorted(shard_rows["0"]["sample_id"].to_list() + shard_rows["1"]["sample_id"].to_list()) == sorted(
        raw["sample_id"].to_list()
    )
    assert min(frame.height for frame in shard_rows.values()) >= 1
    for shard, frame in shard_rows.items():
        assert {shard_of(sample, 2) for sample in frame["sample_id"]} == {int(shard)}
    calls = Counter()
    for name in ("new_instructions", "better_responses"):
        for shard in "01":
            calls[name] += pl.read_parquet(store / name / "tiny" / f"{shard}.parquet").height
    assert calls == {"new_instructions": raw.height, "better_responses": 2 * raw.height}
    sharded_decisions = pl.read_parquet(store / "sample_decisions" / "tiny.parquet")
    assert sharded_decisions.height == raw.height
    checks = {
        (c.asset_key.to_user_string(), c.check_name): c.passed for r in results for c in r.get_asset_check_evaluations()
    }
    assert checks[("sample_decisions", "one_decision_per_raw_sample")] is True
    assert latest_metadata(instance, "student_scores")["shard"] in ("0 of 2", "1 of 2")

    # every shard in one go on machine 1 (the plain CLI plan): shard 1 again, now into this cache,
    # reproduces machine 2's file
    machine2_rows = pl.read_parquet(store / "new_instructions" / "tiny" / "1.parquet")
    results = run(sharded, "*sample_decisions")
    assert [r.dagster_run.tags["dagster/partition"] for r in results] == ["tiny", "tiny|0", "tiny|1", "tiny"]
    assert all(r.success for r in results)
    assert pl.read_parquet(store / "new_instructions" / "tiny" / "1.parquet").equals(machine2_rows)
    assert pl.read_parquet(store / "sample_decisions" / "tiny.parquet").equals(sharded_decisions)

    # the same source unsharded, over the same storage and caches
    plain_file = sharded_catalog(tmp_path / "plain", "../tiny.jsonl", None)
    plain = build_definitions(sources_file=plain_file, storage_dir=store, resources=resources)
    assert all(r.success for r in run(plain, "*sample_decisions"))
    assert latest_metadata(instance, "new_instructions")["calls_made"] == 0
    assert latest_metadata(instance, "better_responses")["calls_made"] == 0
    assert latest_metadata(instance, "student_scores")["texts_computed"] == 0
    plain_decisions = pl.read_parquet(store / "sample_decisions" / "tiny.parquet")
    assert plain_decisions.sort("sample_id").equals(sharded_decisions.sort("sample_id"))

    # the audit CLI reads the sharded layout of the catalog it is given
    sample = sharded_decisions["sample_id"][0]
    env = os.environ | {"SRT_SOURCES_FILE": str(sharded_file)}
    cli = [sys.executable, "-m", "srt_assets.cli", "explain", sample, "--storage", str(store), "--json"]
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stderr
    assert '"new_instructions"' in shown.stdout and '"student_scores"' in shown.stdout


@pytest.mark.slow
def test_an_empty_shard_materializes_empty_tables(tmp_path, student_model_dir):
    """A small source under a catalog-wide shard count leaves some shards without rows: their runs
    succeed with empty, typed tables and passing checks, and call no model."""
    rows = alpaca_rows(2, with_input=0)
    write_jsonl(tmp_path / "tiny.jsonl", rows)
    defs = build_definitions(
        sources_file=sharded_catalog(tmp_path, "tiny.jsonl", 8),
        storage_dir=tmp_path / "store",
        resources={"student": StudentModelResource(model=str(student_model_dir))},
    )
    instance = DagsterInstance.ephemeral(tempdir=str(tmp_path / "home"))
    assert all(r.success for r in materialize_partition("tiny", "raw_samples", defs=defs, instance=instance))
    raw = pl.read_parquet(tmp_path / "store" / "raw_samples" / "tiny.parquet")
    empty = min(set(range(8)) - {shard_of(sample, 8) for sample in raw["sample_id"]})
    (result,) = materialize_partition("tiny", None, shard=empty, defs=defs, instance=instance)
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    for name in ROW_STAGES:
        table = pl.read_parquet(tmp_path / "store" / name / "tiny" / f"{empty}.parquet")
        assert table.height == 0 and table.schema["sample_id"] == pl.String, name
    assert latest_metadata(instance, "new_instructions")["calls_made"] == 0

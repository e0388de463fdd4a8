"""The raw stage through the real Definitions: materialization, stored Parquet, checks and blocking."""

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO_ROOT, alpaca_rows, in_fresh_interpreter, write_catalog, write_jsonl
from dagster import AssetKey, Definitions, asset

from srt_assets.definitions import build_definitions

RAW_ASSETS = [AssetKey("raw_samples"), AssetKey("raw_rejects")]


def run_partition(defs: Definitions, partition: str, instance, asset_selection=RAW_ASSETS, **kwargs):
    """Materialize the raw stage (by default) of one partition; never raises."""
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False, asset_selection=asset_selection, **kwargs
    )


def checks_by_name(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.mark.integration
def test_demo_partition_materializes_through_the_real_definitions(tmp_path: Path, dagster_instance):
    defs = build_definitions(sources_file=REPO_ROOT / "sources.yaml", storage_dir=tmp_path)
    result = run_partition(
        defs, "demo", dagster_instance, asset_selection=[AssetKey("raw_samples"), AssetKey("raw_rejects")]
    )
    assert result.success
    samples = pl.read_parquet(tmp_path / "raw_samples" / "demo.parquet")
    expected = [json.loads(line) for line in (REPO_ROOT / "data/demo/alpaca_demo.jsonl").read_text().splitlines()]
    assert samples.height == len(expected) == 40
    assert samples.get_column("output").to_list() == [r["output"] for r in expected]
    assert samples.get_column("sample_id").n_unique() == 40
    assert all(checks_by_name(result).values()) and len(checks_by_name(result)) == 5
    materialization = dagster_instance.get_latest_materialization_event(AssetKey("raw_samples"))
    metadata = materialization.asset_materialization.metadata
    assert metadata["dagster/partition_row_count"].value == 40
    assert [c.name for c in metadata["dagster/column_schema"].value.columns][:3] == ["sample_id", "source", "row_index"]
    assert metadata["license"].value == "CC BY-NC 4.0" and metadata["file_present"].value is True
    assert "| sample_id |" in metadata["preview"].value and "showing 5 of 40 rows" in metadata["preview"].value
    assert "sample_id: " + samples["sample_id"][0] in metadata["preview_rows_whole"].value  # explain config
    longest = samples["output"].str.len_chars().max()
    assert metadata["length_chars"].value.splitlines()[-1].startswith("| output |")  # a table, not JSON
    assert metadata["length_chars"].value.endswith(f"| {longest} |")
    assert [c.description for c in metadata["dagster/column_schema"].value.columns if c.name == "sample_id"] != [None]
    assert list(metadata).index("file") > list(metadata).index("length_chars")  # paths after what people read


@pytest.fixture
def bad_catalog(tmp_path: Path) -> Path:
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(8)]
    records += [{"instruction": "q", "input": "", "output": ""}] * 2  # 2 of 10 rejected: 20%
    write_jsonl(tmp_path / "bad.jsonl", records)
    return write_catalog(tmp_path, {"bad": {"path": "bad.jsonl", "max_reject_ratio": 0.1}})


@pytest.mark.integration
def test_failed_blocking_check_stops_downstream(tmp_path: Path, bad_catalog: Path, dagster_instance):
    base = build_definitions(sources_file=bad_catalog, storage_dir=tmp_path / "store")
    defs = Definitions.merge(base, Definitions(assets=[_partitioned_probe(base)]))
    result = run_partition(defs, "bad", dagster_instance, asset_selection=[*RAW_ASSETS, AssetKey("probe_after_raw")])
    checks = checks_by_name(result)
    assert checks["reject_ratio_below_bound"] is False
    assert checks["sample_id_unique"] is True
    rejects = pl.read_parquet(tmp_path / "store" / "raw_rejects" / "bad.parquet")
    assert rejects.get_column("reason").to_list() == ["empty_field", "empty_field"]
    assert rejects.get_column("row_index").to_list() == [8, 9]
    assert dagster_instance.get_latest_materialization_event(AssetKey("probe_after_raw")) is None
    assert not result.success


def _partitioned_probe(base: Definitions):
    partitions = base.resolve_assets_def("raw_samples").partitions_def

    @asset(partitions_def=partitions, deps=["raw_samples"])
    def probe_after_raw() -> None:
        """Stands in for the next stage: it must not run after a failed blocking check."""

    return probe_after_raw


@pytest.mark.integration
def test_missing_source_file_fails_the_asset_naming_the_path(tmp_path: Path, dagster_instance, monkeypatch):
    monkeypatch.delenv("SRT_TEST_WIZ", raising=False)
    catalog = write_catalog(tmp_path, {"wiz": {"path": "nowhere/wiz.json", "path_env": "SRT_TEST_WIZ"}})
    defs = build_definitions(sources_file=catalog, storage_dir=tmp_path / "store")
    result = run_partition(defs, "wiz", dagster_instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    message += failure.step_failure_data.error.message
    assert str(tmp_path / "nowhere" / "wiz.json") in message and "SRT_TEST_WIZ" in message


@pytest.mark.integration
@pytest.mark.shared_data
def test_full_alpaca_materializes_every_row(tmp_path: Path, dagster_instance, shared_data: Path, monkeypatch):
    monkeypatch.setenv("SRT_ALPACA_PATH", str(shared_data / "alpaca_data.json.gz"))
    defs = build_definitions(sources_file=REPO_ROOT / "sources.yaml", storage_dir=tmp_path)
    result = run_partition(defs, "alpaca", dagster_instance)
    assert result.success
    samples = pl.read_parquet(tmp_path / "raw_samples" / "alpaca.parquet")
    rejects = pl.read_parquet(tmp_path / "raw_rejects" / "alpaca.parquet")
    assert samples.height + rejects.height == 52002
    assert rejects.height == 28  # the 28 empty outputs of Alpaca
    assert set(rejects.get_column("reason")) == {"empty_field"}
    assert set(rejects.get_column("field")) == {"output"}
    assert samples.get_column("sample_id").is_unique().all()


@pytest.mark.integration
def test_observing_the_source_files_records_each_source(tmp_path: Path, dagster_instance):
    """The `source_files` observation (the UI's Observe button): per partition, whether the file is
    there, its details, and a data version that changes when the file does."""
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    catalog = write_catalog(
        tmp_path,
        {"a": {"path": "a.jsonl", "license": "MIT", "description": "one row"}, "gone": {"path": "nowhere.jsonl"}},
    )
    defs = build_definitions(sources_file=catalog, storage_dir=tmp_path / "store")
    job = defs.resolve_implicit_global_asset_job_def()

    def observe() -> dict:
        result = job.execute_in_process(instance=dagster_instance, asset_selection=[AssetKey("source_files")])
        assert result.success
        events = [e.event_specific_data.asset_observation for e in result.all_events if e.is_asset_observation]
        return {o.partition: o for o in events}

    first = observe()
    assert set(first) == {"a", "gone"}
    a, gone = first["a"].metadata, first["gone"].metadata
    assert a["file_present"].value is True and a["license"].value == "MIT" and a["description"].value == "one row"
    assert gone["file_present"].value is False and "set" not in gone["how_to_fix"].value  # no variable to name
    assert str(tmp_path / "nowhere.jsonl") in gone["how_to_fix"].value
    assert first["gone"].tags["dagster/data_version"] == "missing"
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "input": "", "output": "a longer answer"}])
    assert observe()["a"].tags["dagster/data_version"] != first["a"].tags["dagster/data_version"]


def test_raw_samples_is_a_module_level_asset_a_test_can_call(tmp_path: Path):
    """The stage's asset is importable and runs on a context built in the test (no Definitions, no
    instance): its outputs and its check results, from a real file."""
    from dagster import AssetCheckResult, Output, build_asset_context

    from srt_assets.defs.partitions import SOURCES
    from srt_assets.defs.raw.assets import raw_samples
    from srt_assets.resources import SourceCatalogResource, StorageResource

    name = SOURCES.get_partition_keys()[0]  # a partition of the catalog the code location loaded
    good = alpaca_rows(3)
    write_jsonl(tmp_path / "rows.jsonl", [*good, {"instruction": " ", "input": "", "output": "x"}])
    catalog = write_catalog(tmp_path, {name: {"path": "rows.jsonl", "max_reject_ratio": 0.5}})
    sources = SourceCatalogResource(sources_file=str(catalog))
    storage = StorageResource(base_dir=str(tmp_path / "store"))
    events = list(raw_samples(build_asset_context(partition_key=name), sources, storage))
    outputs = {e.output_name: e.value.scan().collect() for e in events if isinstance(e, Output)}  # staged files
    assert outputs["raw_samples"].height == len(good) and outputs["raw_rejects"]["reason"].to_list() == ["empty_field"]
    checks = {e.check_name: e.passed for e in events if isinstance(e, AssetCheckResult)}
    assert checks and all(checks.values()) and "reject_ratio_below_bound" in checks


def run_raw_directly(tmp_path: Path, name: str, catalog: Path) -> tuple[dict, dict, dict]:
    """The asset called on a built context: its staged tables, their metadata and its checks."""
    from dagster import AssetCheckResult, Output, build_asset_context

    from srt_assets.defs.raw.assets import raw_samples
    from srt_assets.resources import SourceCatalogResource, StorageResource

    sources = SourceCatalogResource(sources_file=str(catalog))
    storage = StorageResource(base_dir=str(tmp_path / "store"))
    events = list(raw_samples(build_asset_context(partition_key=name), sources, storage))
    outputs = {e.output_name: e for e in events if isinstance(e, Output)}
    checks = {e.check_name: e for e in events if isinstance(e, AssetCheckResult)}
    return {n: o.value for n, o in outputs.items()}, {n: o.metadata for n, o in outputs.items()}, checks


def test_raw_samples_writes_a_row_group_per_block(tmp_path: Path, monkeypatch):
    """A source larger than the block is written a block at a time, one row group each, and reads back
    as the one-block table, metadata and checks alike; a duplicate across blocks is still rejected."""
    import pyarrow.parquet as pq

    from srt_assets.defs.partitions import SOURCES

    name = SOURCES.get_partition_keys()[0]
    records = [{"instruction": f"q{i}", "input": "x" * (i % 3), "output": f"a{i}"} for i in range(50)]
    records[41] = dict(records[2])  # a duplicate of a row of the first block
    records[20] = {"instruction": "q", "output": 7}
    write_jsonl(tmp_path / "rows.jsonl", records)
    catalog = write_catalog(tmp_path, {name: {"path": "rows.jsonl", "max_reject_ratio": 0.5}})
    whole = run_raw_directly(tmp_path, name, catalog)
    monkeypatch.setattr("srt_assets.defs.raw.assets.RAW_BLOCK_ROWS", 8)
    blocks = run_raw_directly(tmp_path, name, catalog)
    assert pq.ParquetFile(blocks[0]["raw_samples"].path).num_row_groups == 7  # 50 rows, 48 kept
    assert pq.ParquetFile(whole[0]["raw_samples"].path).num_row_groups == 1
    for table in ("raw_samples", "raw_rejects"):
        assert blocks[0][table].scan().collect().equals(whole[0][table].scan().collect())
        changing = {"read_at", "load_seconds"}
        assert {k: v for k, v in blocks[1][table].items() if k not in changing} == {
            k: v for k, v in whole[1][table].items() if k not in changing
        }
    rejects = blocks[0]["raw_rejects"].scan().collect()
    assert rejects.select("row_index", "reason", "detail").rows() == [
        (20, "wrong_type", "field 'output' is int, expected a string"),
        (41, "duplicate", "same instruction, input and output as row 2"),
    ]
    assert {n: (c.passed, c.metadata) for n, c in blocks[2].items()} == {
        n: (c.passed, c.metadata) for n, c in whole[2].items()
    }
    assert all(c.passed for c in blocks[2].values()) and blocks[2]["no_nulls"].metadata["rows_checked"].value == 48


def raw_stage_peaks(tmp_path: Path) -> tuple[int, int]:
    """Python's peak while the stage reads, writes and checks 2,000 and 8,000 rows in blocks of 500."""
    import gc
    import tracemalloc

    import srt_assets.defs.raw.assets as raw_assets
    from srt_assets.defs.partitions import SOURCES

    name = SOURCES.get_partition_keys()[0]
    raw_assets.RAW_BLOCK_ROWS = 500

    def peak(rows: int) -> int:
        words = " ".join(["texts of a realistic length"] * 8)  # ~220 characters a field
        records = [{"instruction": f"Describe item {i}: {words}", "input": "", "output": f"Item {i}: {words}"}
                   for i in range(rows)]  # fmt: skip
        write_jsonl(tmp_path / f"{rows}.jsonl", records)
        catalog = write_catalog(tmp_path, {name: {"path": f"{rows}.jsonl"}})
        gc.collect()
        tracemalloc.start()
        try:
            run_raw_directly(tmp_path, name, catalog)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(500)  # imports and caches, once
    return peak(2000), peak(8000)


@pytest.mark.integration
def test_raw_samples_memory_follows_the_block_not_the_rows(tmp_path: Path):
    """What grows with the rows is only the ids' and hashes' few bytes a row (duplicates across blocks,
    uniqueness across blocks), never the texts: every row's texts were Python lists at once before
    (1.1 GB at a million rows; ~500 bytes a row of these texts). Measured in a fresh interpreter, as
    `srt materialize` runs the stage."""
    small, large = in_fresh_interpreter("test_raw_assets", "raw_stage_peaks", tmp_path)
    assert (large - small) / 6000 <= 128, (small, large)  # bytes per extra row: ids and hashes, no texts

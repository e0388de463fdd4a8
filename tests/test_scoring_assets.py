"""student_base_model and student_scores through the real Definitions, with the GPU resource injected."""

from pathlib import Path

import polars as pl
import pytest
from conftest import REPO_ROOT, latest_metadata, materialize, table_cells, write_catalog, write_jsonl
from openai_server import ScriptedOpenAIServer

from srt_assets.definitions import build_definitions
from srt_assets.resources import ComputeResource, OpenAIChatResource, StudentModelResource

pytestmark = pytest.mark.slow


def run(defs, partition, instance, selection=None, run_config=None):
    upto = None if selection else "student_scores"
    return materialize(defs, partition, instance, upto=upto, run_config=run_config, selection=selection)


@pytest.fixture
def scripted_teacher():
    """The teacher behind a scripted local OpenAI-compatible server (fast, deterministic)."""
    with ScriptedOpenAIServer() as server:
        yield OpenAIChatResource(model="scripted", base_url=server.base_url)


def test_demo_scores_then_rerun_makes_no_model_calls(
    tmp_path: Path, dagster_instance, student_model_dir, scripted_teacher
):
    defs = build_definitions(
        sources_file=REPO_ROOT / "sources.yaml",
        storage_dir=tmp_path,
        resources={
            "student": StudentModelResource(model=str(student_model_dir), template="chat"),
            "gpu": ComputeResource(device="auto", dtype="float32"),
            "teacher": scripted_teacher,
        },
    )
    first = run(defs, "demo", dagster_instance)
    assert first.success
    scores = pl.read_parquet(tmp_path / "student_scores" / "demo.parquet")
    raw = pl.read_parquet(tmp_path / "raw_samples" / "demo.parquet")
    assert raw.height == 40 and scores.height == 4 * 40
    assert scores.filter(pl.col("variant") == "ori")["sample_id"].sort().to_list() == raw["sample_id"].sort().to_list()
    assert scores.group_by("sample_id").len()["len"].to_list() == [4] * 40
    assert scores["ifd"].is_not_null().all() and (scores["ifd"] > 0).all()
    assert scores["rifd"].is_not_null().all()
    meta = latest_metadata(dagster_instance, "student_scores")
    compute = table_cells(meta["compute"])
    assert compute["device"] == "cpu" and compute["dtype"] == "float32"
    computed, latest_first = meta["texts_computed"], meta
    assert table_cells(meta["student"])["fingerprint"] and meta["model_loaded"] is True
    assert 0 < computed == meta["unique_texts"] <= meta["texts"] == 16 * 40
    assert meta["ifd_histogram"].startswith("| IFD | n |") and len(meta["ifd_histogram"]) < 1000  # shown inline
    assert meta["served_from_cache"] is False and meta["tokens_per_second"] > 0
    assert {e.check_name: e.passed for e in first.get_asset_check_evaluations()}["scores_finite"]

    second = run(defs, "demo", dagster_instance)
    assert second.success
    meta = latest_metadata(dagster_instance, "student_scores")
    assert meta["texts_computed"] == 0 and meta["texts_from_cache"] == computed and meta["model_loaded"] is False
    # the figures of the run that computed the scores stay visible, marked as served from the cache
    assert meta["served_from_cache"] is True and meta["figures_from_run"] == first.run_id
    assert meta["tokens_per_second"] == latest_first["tokens_per_second"] > 0
    assert pl.read_parquet(tmp_path / "student_scores" / "demo.parquet").equals(scores)


def test_unscorable_rows_are_null_with_reason_and_fail_the_gate(
    tmp_path: Path, dagster_instance, student_model_dir, scripted_teacher
):
    long_prompt = "Explain this in detail: " + "word " * 60
    records = [{"instruction": long_prompt, "input": "", "output": "Short answer."}] + [
        {"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(3)
    ]
    write_jsonl(tmp_path / "t.jsonl", records)
    catalog = write_catalog(tmp_path, {"tiny": {"path": "t.jsonl"}})
    defs = build_definitions(
        sources_file=catalog,
        storage_dir=tmp_path / "store",
        resources={
            "student": StudentModelResource(model=str(student_model_dir), template="alpaca", max_length=48),
            "teacher": scripted_teacher,
        },
    )
    result = run(defs, "tiny", dagster_instance)
    scores = pl.read_parquet(tmp_path / "store" / "student_scores" / "tiny.parquet")
    first = scores.filter(pl.col("variant") == "ori").row(0, named=True)
    assert first["ifd"] is None and first["ppl_A_condition"] is None  # null, never a silent 0
    assert "no target tokens left after truncation" in first["null_reason"] and first["truncated"]
    short_rows = scores.filter(~pl.col("sample_id").is_in([first["sample_id"]]) & (pl.col("variant") == "ori"))
    assert short_rows["ifd"].is_not_null().all()
    checks = {
        e.check_name: e.passed for e in result.get_asset_check_evaluations() if e.asset_key.path == ["student_scores"]
    }
    assert checks == {"scores_finite": True, "null_ratio_below_bound": False, "row_count_matches_input": True}
    assert not result.success  # the blocking check failed


def test_student_base_model_is_a_module_level_asset_a_test_can_call(student_model_dir, tmp_path):
    """The stage's asset runs on a context built in the test: it names the model directory and its
    content fingerprint, as every cache key does."""
    from dagster import build_asset_context

    from srt_assets.defs.student.assets import student_base_model
    from srt_assets.models.identity import model_fingerprint
    from srt_assets.resources import StorageResource

    result = student_base_model(
        build_asset_context(),
        StudentModelResource(model=str(student_model_dir)),
        StorageResource(base_dir=str(tmp_path)),
    )
    assert result.metadata["fingerprint_sha256"] == model_fingerprint(student_model_dir)
    assert result.metadata["path"].value == str(student_model_dir)

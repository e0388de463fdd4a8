"""benchmark_scores: the Open LLM Leaderboard v1 tasks on every checkpoint and the base student (the asset called
directly with the real bundled student), its side-by-side tables, the smoke-run label, absent data shown as such."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import AssetCheckResult, Output, build_asset_context

from srt_assets.core.harness import AVERAGE_TASK, OWN_ITEMS_DIR, TABLE_SCHEMA, TRUTHFULQA_SAMPLE
from srt_assets.defs.evaluation.benchmarks import (
    BenchmarkConfig,
    benchmark_data,
    benchmark_scores,
    benchmark_section,
    cost_by_checkpoint,
    row_outcome,
    scores_by_checkpoint,
)
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.training.assets import TRAINING_SETS, checkpoint_dir
from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource

CHECKPOINTS = [*TRAINING_SETS, "base"]


def score_rows(limit: int | None = 2) -> pl.DataFrame:
    """Rows as run_leaderboard writes them: TruthfulQA scored, ARC without data, the average not computed."""
    rows = []
    for n, checkpoint in enumerate(CHECKPOINTS):
        base = dict.fromkeys(TABLE_SCHEMA) | {"checkpoint": checkpoint, "limit": limit, "data": ""}
        rows += [
            base | {"task": "truthfulqa_mc2", "metric": "acc", "value": 0.4 + n / 100, "stderr": 0.1, "n_items": 2,
                    "tokens": 300, "seconds": 1.5, "status": "ok", "data": "sample (20 items)"},
            base | {"task": "arc_challenge", "metric": "acc_norm", "status": "data absent: no Hub-layout folder"},
            base | {"task": AVERAGE_TASK, "metric": "mean", "status": "not computed: arc_challenge: data absent"},
        ]  # fmt: skip
    return pl.DataFrame(rows, schema=TABLE_SCHEMA)


def test_the_tables_show_absent_data_as_absent_and_checkpoints_side_by_side():
    table = score_rows()
    wide = scores_by_checkpoint(table)
    assert wide.columns == ["checkpoint", "truthfulqa_mc2", "arc_challenge", AVERAGE_TASK]
    assert wide["checkpoint"].to_list() == CHECKPOINTS
    selected = wide.row(0, named=True)
    assert selected["truthfulqa_mc2"] == "0.4 ± 0.1 (2 items)"
    assert (selected["arc_challenge"], selected[AVERAGE_TASK]) == ("data absent", "not computed")
    cost = cost_by_checkpoint(table).row(4, named=True)
    assert cost == {"checkpoint": "base", "truthfulqa_mc2": "1.5 s, 300 tokens", "arc_challenge": "data absent"}
    section = benchmark_section(table)
    assert section.title == "Open LLM Leaderboard v1 (lm-evaluation-harness)"
    assert section.note.startswith("Smoke run: at most 2 items per task.") and "for arc_challenge" in section.note
    assert section.table.columns == ["task", *CHECKPOINTS]
    assert section.table.filter(pl.col("task") == "arc_challenge").row(0)[1:] == ("data absent",) * 5
    assert "Full data" in benchmark_section(score_rows(None)).note


def test_the_check_names_each_missing_row():
    table = score_rows().filter(~((pl.col("checkpoint") == "base") & (pl.col("task") == "arc_challenge")))
    assert row_outcome(score_rows(), CHECKPOINTS, ["truthfulqa_mc2", "arc_challenge"]).passed
    outcome = row_outcome(table, CHECKPOINTS, ["truthfulqa_mc2", "arc_challenge", "mmlu"])
    assert not outcome.passed
    assert outcome.metadata["missing"] == ["selected/mmlu", "random/mmlu", "full/mmlu", "teacher/mmlu",
                                           "base/arc_challenge", "base/mmlu"]  # fmt: skip


def test_hub_dir_may_start_with_the_shared_data_folder(monkeypatch):
    monkeypatch.setenv("SRT_SHARED_DATA", str(OWN_ITEMS_DIR.parent))
    data = benchmark_data(BenchmarkConfig(hub_dir="$SRT_SHARED_DATA/srt_own_items"))
    assert data.hub_dir == OWN_ITEMS_DIR and data.truthfulqa_mc == TRUTHFULQA_SAMPLE
    assert benchmark_data(BenchmarkConfig()).hub_dir is None


@pytest.mark.slow
def test_every_checkpoint_and_the_base_student_get_a_row_per_task(student_model_dir, tmp_path):
    storage = StorageResource(base_dir=str(tmp_path / "storage"))
    source = SOURCES.get_partition_keys()[0]
    for name in TRAINING_SETS:  # every checkpoint is the bundled student: the same model under five names
        checkpoint_dir(storage, source, name).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_dir(storage, source, name).symlink_to(student_model_dir, target_is_directory=True)
    config = BenchmarkConfig(limit=1, tasks=["truthfulqa_mc2", "arc_challenge"])
    events = list(
        benchmark_scores(
            build_asset_context(partition_key=source),
            config,
            StudentModelResource(model=str(student_model_dir)),
            ComputeResource(device="cpu"),
            storage,
        )
    )
    [output] = [e for e in events if isinstance(e, Output)]
    [check] = [e for e in events if isinstance(e, AssetCheckResult)]
    assert (check.check_name, check.passed) == ("row_per_checkpoint_and_task", True)
    table = output.value
    assert table.height == 5 * 3 and table["checkpoint"].unique(maintain_order=True).to_list() == CHECKPOINTS
    truthful = table.filter(pl.col("task") == "truthfulqa_mc2")
    assert truthful["n_items"].to_list() == [1] * 5 and (truthful["tokens"] > 0).all()
    assert (truthful["seconds"] > 0).all() and (truthful["status"] == "ok").all()
    # one fingerprint under five names: scored once, read from the call cache four times
    assert truthful["from_cache"].to_list() == [False, True, True, True, True]
    assert (output.metadata["scores_from_cache"].value, output.metadata["scores_computed"].value) == (4, 1)
    assert truthful["value"].is_between(0, 1).all() and truthful["value"].n_unique() == 1  # one model, five names
    arc = table.filter(pl.col("task") == "arc_challenge")
    assert arc["value"].is_null().all() and arc["status"].str.starts_with("data absent").all()
    assert table.filter(pl.col("task") == AVERAGE_TASK)["value"].is_null().all()
    assert (table["limit"] == 1).all()
    metadata = output.metadata
    assert metadata["run"].value == "smoke run: at most 1 items per task"
    assert "| base | " in metadata["scores"].value and "data absent" in metadata["scores"].value
    assert "tokens" in metadata["seconds_and_tokens"].value
    assert (tmp_path / "storage").exists() and (storage.reports_dir / source / "lm_eval" / "base" / "tasks").is_dir()

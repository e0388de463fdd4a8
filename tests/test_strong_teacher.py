"""The shipped strong-teacher experiment (sources.yaml `alpaca_gpt4_999`, configs/alpaca_gpt4_999.yaml) on a
slice: a few matched Alpaca rows, the real bundled student, two training steps, a few references. It keeps the
path working: GPT-4's answers paired with their Alpaca rows by instruction, no teacher call, the student's
choice between the two answers, the Reflection-Tuning baseline, every checkpoint scored on both references with
intervals, the random baseline over two seeds, and the report's four-way comparison."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest
import yaml
from conftest import REPO_ROOT, latest_metadata, materialize, write_catalog
from dagster import AssetKey

from srt_assets.core.sources import match_key
from srt_assets.definitions import build_definitions
from srt_assets.resources import StudentModelResource, TrainingResource

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROWS = 6
ASSETS = [
    "raw_samples", "raw_rejects", "new_instructions", "better_responses", "student_scores", "sample_decisions",
    "selected_dataset", "baseline_random", "baseline_full", "baseline_teacher", "training_sets", "student_base_model",
    "finetuned_selected", "finetuned_random", "finetuned_full", "finetuned_teacher", "evaluation_prompts",
    "reference_loss", "random_seed_losses", "experiment_report",
]  # fmt: skip


def slice_run_config(shared_data) -> dict:
    """The shipped config, its sizes cut down; everything else as shipped."""
    shipped = yaml.safe_load((REPO_ROOT / "configs" / "alpaca_gpt4_999.yaml").read_text(encoding="utf-8"))
    ops = {name: op for name, op in shipped["ops"].items() if name in ASSETS}
    ops["evaluation_prompts"]["config"] |= {"data_dir": str(shared_data), "sets": [], "reference_count": 3}
    ops["random_seed_losses"]["config"]["seeds"] = [1]
    # keep every scored branch, so six rows always give a set to train on (the rule itself is unit-tested)
    ops["sample_decisions"] = {"config": {"keep_unreflected": True, "ifd_below": 10.0, "rifd_below": 10.0}}
    return {"ops": ops}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, student_model_dir):
    from conftest import SHARED_DATA
    from dagster import DagsterInstance

    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs Stanford Alpaca and alpaca_gpt4_en_demo_999.json, not found at {SHARED_DATA}: set "
                    "SRT_SHARED_DATA to the folder that holds them")  # fmt: skip
    root = tmp_path_factory.mktemp("gpt4")
    entry = yaml.safe_load((REPO_ROOT / "sources.yaml").read_text(encoding="utf-8"))["sources"]["alpaca_gpt4_999"]
    entry |= {"path": str(SHARED_DATA / "alpaca_data.json.gz"), "limit": ROWS}
    entry["reflections"]["A"]["path"] = str(SHARED_DATA / "alpaca_gpt4_en_demo_999.json")
    defs = build_definitions(
        sources_file=write_catalog(root, {"gpt4": entry}),
        storage_dir=root / "store",
        resources={
            "student": StudentModelResource(model=str(student_model_dir)),
            "training": TrainingResource(max_steps=2, batch_size=2, max_length=128),
        },
    )
    instance = DagsterInstance.ephemeral(tempdir=str(root / "home"))
    result = materialize(defs, "gpt4", instance, run_config=slice_run_config(SHARED_DATA),
                         selection=[AssetKey(name) for name in ASSETS])  # fmt: skip
    return {"result": result, "store": root / "store", "instance": instance, "shared": SHARED_DATA}


def test_the_slice_runs_without_a_teacher_call_on_the_matched_alpaca_rows(experiment):
    result, store = experiment["result"], experiment["store"]
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    raw = pl.read_parquet(store / "raw_samples" / "gpt4.parquet")
    with gzip.open(experiment["shared"] / "alpaca_data.json.gz") as file:
        alpaca = json.loads(file.read())
    gpt4 = json.loads((experiment["shared"] / "alpaca_gpt4_en_demo_999.json").read_text(encoding="utf-8"))
    answered = {match_key(r["instruction"], r["input"]): r["output"] for r in gpt4}
    expected = [i for i, r in enumerate(alpaca) if match_key(r["instruction"], r["input"]) in answered][:ROWS]
    assert raw["row_index"].to_list() == expected  # the first six Alpaca rows GPT-4 answered, as Alpaca has them
    assert raw["output"].to_list() == [alpaca[i]["output"] for i in expected]
    assert pl.read_parquet(store / "new_instructions" / "gpt4.parquet").height == 0  # no instruction reflection
    answers = pl.read_parquet(store / "better_responses" / "gpt4.parquet")
    assert set(answers["variant"]) == {"A"} and (answers["status"] == "ok").all()
    joined = answers.join(raw.select("sample_id", "instruction", "input"), on="sample_id")
    assert [answered[match_key(i, x)] for i, x in zip(joined["instruction"], joined["input"], strict=True)] == (
        joined["output"].to_list()
    )
    assert latest_metadata(experiment["instance"], "better_responses")["calls_made"] == 0
    scores = pl.read_parquet(store / "student_scores" / "gpt4.parquet")
    assert set(scores["variant"]) == {"ori", "A"} and scores["rifd"].is_finite().all()


def test_the_teacher_baseline_holds_gpt4s_answers_and_the_report_compares_four_ways(experiment):
    store = experiment["store"]
    teacher = pl.read_parquet(store / "baseline_teacher" / "gpt4.parquet")
    answers = pl.read_parquet(store / "better_responses" / "gpt4.parquet")
    assert teacher.height == ROWS and set(teacher["variant"]) <= {"A", "ori"}
    gpt4_rows = teacher.filter(pl.col("variant") == "A").join(answers.select("sample_id", "output"), on="sample_id")
    assert gpt4_rows.height > 0 and (gpt4_rows["output"] == gpt4_rows["output_right"]).all()
    losses = pl.read_parquet(store / "reference_loss" / "gpt4.parquet")
    assert set(losses["prompt_set"]) == {"alpaca_eval", "alpaca_eval_gpt4"}
    assert set(losses["dataset"]) == {"selected", "random", "full", "teacher"} and losses["loss"].is_finite().all()
    checks = {c.check_name: c for c in experiment["result"].get_asset_check_evaluations()}
    for baseline in ("random", "teacher", "full", "base"):
        assert "paired bootstrap interval" in checks[f"selected_beats_{baseline}"].description
    seeds = pl.read_parquet(store / "random_seed_losses" / "gpt4.parquet")
    assert "baseline_random" in set(seeds["draw"]) and set(seeds["draw"]) <= {"baseline_random", "seed 1"}
    report = (store / "reports" / "gpt4" / "report.md").read_text(encoding="utf-8")
    assert "## Selected vs each baseline, with 95% intervals" in report
    assert "## The random baseline over seeds" in report and "| teacher |" in report

"""The whole graph, raw → candidates → scores → selection → checkpoints → evaluation → report, with
the real default models (bundled SmolLM2 as student and teacher) on a tiny source, then the reruns
users rely on: an unchanged rerun makes no model calls, a selection change reruns only what it
affects, and another source is never touched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import alpaca_rows, demo_ops, latest_metadata, materialize, table_cells, write_catalog, write_jsonl
from dagster import AssetKey

from srt_assets.definitions import build_definitions
from srt_assets.models.chat_model import SMALL_TEACHER_PROMPTS
from srt_assets.plots import markdown_text
from srt_assets.resources import StudentModelResource, TrainingResource, TransformersChatResource

pytestmark = [pytest.mark.slow]
CHECKPOINTS = ("selected", "random", "full", "teacher")


def run_config(**selection) -> dict:
    ops = {
        **demo_ops(),
        # keep every scored branch so the tiny selection is never empty; the rule itself is unit-tested
        "sample_decisions": {"config": {"keep_unreflected": True, "ifd_below": 10.0, "rifd_below": 10.0, **selection}},
        "evaluation_prompts": {"config": {"sets": ["vicuna", "koala"], "per_set": 1, "reference_count": 3}},
        "evaluation_answers": {"config": {"max_new_tokens": 12}},
        "pairwise_verdicts": {"config": {"max_tokens": 12}},
        "alpacaeval_outputs": {"config": {"count": 2, "max_new_tokens": 12}},
        "alpacaeval_results": {"config": {"max_tokens": 12}},
        "mt_bench_answers": {"config": {"count": 1, "max_new_tokens": 12}},
        "mt_bench_scores": {"config": {"max_tokens": 12}},
        "random_seed_losses": {"config": {"seeds": [1]}},
        "benchmark_scores": {"config": {"limit": 1, "tasks": ["truthfulqa_mc2"]}},
    }
    return {"ops": ops}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, student_model_dir):
    from dagster import DagsterInstance

    root = tmp_path_factory.mktemp("e2e")
    write_jsonl(root / "tiny.jsonl", alpaca_rows(3, with_input=1))
    write_jsonl(root / "other.jsonl", alpaca_rows(2, with_input=0))
    model = str(student_model_dir)
    defs = build_definitions(
        sources_file=write_catalog(root, {"tiny": {"path": "tiny.jsonl"}, "other": {"path": "other.jsonl"}}),
        storage_dir=root / "store",
        resources={
            "student": StudentModelResource(model=model),
            # the compact, prefilled prompts that 'auto' picks for the bundled teacher
            "teacher": TransformersChatResource(
                model=model, max_tokens=40, batch_size=8, parse_retries=0, prompts_file=str(SMALL_TEACHER_PROMPTS)
            ),
            "training": TrainingResource(max_steps=2, batch_size=2, max_length=192),
        },
    )
    instance = DagsterInstance.ephemeral(tempdir=str(root / "home"))
    other = materialize(defs, "other", instance, upto="raw_samples")
    assert other.success
    first = materialize(defs, "tiny", instance, run_config=run_config())
    return {"root": root, "store": root / "store", "defs": defs, "instance": instance, "first": first}


def test_whole_graph_materializes_with_checks_passing(pipeline):
    result = pipeline["first"]
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert result.success, failures
    checks = result.get_asset_check_evaluations()
    blocking = [c for c in checks if c.blocking]
    assert len(blocking) == 19 and all(c.passed for c in blocking), [c.check_name for c in blocking if not c.passed]
    warn_only = {f"selected_beats_{b}" for b in ("random", "teacher", "full", "base")} | {"student_tells_matched_pairs"}
    assert {c.check_name for c in checks if not c.blocking} == warn_only
    assert all(c.partition == "tiny" for c in checks)  # every result belongs to the partition it checked
    materialized = {e.asset_key for e in result.get_asset_materialization_events() if e.asset_key}
    assert {AssetKey("experiment_report"), AssetKey("finetuned_selected")} <= materialized


def test_selected_rows_trace_back_to_source_and_teacher_calls(pipeline):
    store = pipeline["store"]
    raw = pl.read_parquet(store / "raw_samples" / "tiny.parquet")
    selected = pl.read_parquet(store / "selected_dataset" / "tiny.parquet")
    decisions = pl.read_parquet(store / "sample_decisions" / "tiny.parquet")
    questions = pl.read_parquet(store / "new_instructions" / "tiny.parquet")
    answers = pl.read_parquet(store / "better_responses" / "tiny.parquet")
    assert decisions.height == raw.height and selected.height == int(decisions["selected"].sum()) > 0
    assert set(selected["sample_id"]) <= set(raw["sample_id"])
    joined = selected.join(raw.select("sample_id", pl.col("row_index").alias("raw_row")), on="sample_id")
    assert (joined["row_index"] == joined["raw_row"]).all()
    assert selected["source_file"].str.ends_with("tiny.jsonl").all()
    for row in selected.iter_rows(named=True):
        if row["variant"] in ("A", "QA"):
            assert row["response_call_key"] in set(answers["cache_key"])
        if row["variant"] in ("Q", "QA"):
            assert row["instruction_call_key"] in set(questions["cache_key"])
    exported = json.loads(next((store / "exports" / "selected_dataset" / "tiny").glob("*.alpaca.json")).read_text())
    assert [r["sample_id"] for r in exported] == selected["sample_id"].to_list()
    # the audit CLI, as a user runs it
    sample = selected["sample_id"][0]
    cli = [sys.executable, "-m", "srt_assets.cli", "explain", sample, "--storage", str(store)]
    catalog = {**os.environ, "SRT_SOURCES_FILE": str(pipeline["root"] / "sources.yaml")}  # the run's catalog
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=catalog)
    assert shown.returncode == 0, shown.stderr
    assert "== raw row" in shown.stdout and "in selected_dataset: True" in shown.stdout
    assert decisions.filter(pl.col("sample_id") == sample)["reason"][0][:40] in shown.stdout


def test_checkpoints_evaluation_and_report(pipeline):
    from transformers import AutoModelForCausalLM

    store = pipeline["store"]
    for dataset in CHECKPOINTS:
        manifest = json.loads((store / "checkpoints" / "tiny" / dataset / "srt_manifest.json").read_text())
        assert manifest["training"]["steps"] == 2 and manifest["identity"]["base_model_fingerprint"]
        assert manifest["identity"]["dataset_fingerprint"] and manifest["final_loss"] > 0
    model = AutoModelForCausalLM.from_pretrained(store / "checkpoints" / "tiny" / "selected")
    assert model.config.model_type == "llama"
    answers = pl.read_parquet(store / "evaluation_answers" / "tiny.parquet")
    assert answers.height == len(CHECKPOINTS) * 2 and set(answers["dataset"]) == set(CHECKPOINTS)
    judgements = pl.read_parquet(store / "pairwise_verdicts" / "tiny.parquet")
    assert judgements.height == 2 * 3  # two prompts, three pairs
    assert set(judgements["verdict"]) <= {"win", "tie", "lose", "unjudged"}
    assert judgements["judge_text_first"].is_not_null().all()
    losses = pl.read_parquet(store / "reference_loss" / "tiny.parquet")
    assert losses.height == len(CHECKPOINTS) * 3 * 2 and losses["loss"].is_finite().all()  # two reference sets
    assert set(losses["prompt_set"]) == {"alpaca_eval", "alpaca_eval_gpt4"}
    # a long scoring says it is alive: progress lines per model it scores (base, checkpoints, extra seeds)
    instance, run_id = pipeline["instance"], pipeline["first"].run_id
    scored = {m for e in instance.all_logs(run_id) for m in re.findall(r"reference loss of ([\w ]+):", e.message or "")}
    assert {"base", "selected"} <= scored <= {"base", *CHECKPOINTS, "seed 1"}, scored  # a cached model says nothing
    seeds = pl.read_parquet(store / "random_seed_losses" / "tiny.parquet")
    assert set(seeds["draw"]) <= {"baseline_random", "seed 1"} and seeds["loss"].is_finite().all()
    report_dir = store / "reports" / "tiny"
    markdown = (report_dir / "report.md").read_text()
    assert "selected" in markdown and "Pairwise judging" in markdown
    assert "## Can the student judge?" in markdown and "## Teacher rewrites and their quality flags" in markdown
    diagnosis = pl.read_parquet(store / "student_diagnosis" / "tiny.parquet")
    assert diagnosis.height == 6 and diagnosis["auc"].is_between(0, 1).all() and (diagnosis["pairs"] > 0).all()
    candidates = pl.read_parquet(store / "new_instructions" / "tiny.parquet")
    assert candidates["finish_reason"].is_in(["stop", "length"]).all()  # the teacher says how each reply ended
    assert (report_dir / "report.html").is_file() and (report_dir / "training_curves.png").stat().st_size > 1000


def test_alpaca_eval_and_mt_bench_end_the_report(pipeline):
    store = pipeline["store"]
    outputs = pl.read_parquet(store / "alpacaeval_outputs" / "tiny.parquet")
    assert outputs.height == 2 * len(CHECKPOINTS) and set(outputs["checkpoint"]) == set(CHECKPOINTS)
    exported = json.loads(
        (store / "exports" / "alpacaeval_outputs" / "tiny" / "selected" / "model_outputs.json").read_text()
    )
    assert len(exported) == 2 and set(exported[0]) == {"instruction", "output", "generator", "dataset"}
    results = pl.read_parquet(store / "alpacaeval_results" / "tiny.parquet")
    assert results.height == len(CHECKPOINTS) * 2  # each checkpoint against both references
    assert set(results["reference"]) == {"text_davinci_003", "gpt4_1106_preview"}
    assert (results["n_total"] + results["unjudged"] == 2).all() and (results["judge_calls"] <= 2).all()
    scores = pl.read_parquet(store / "mt_bench_scores" / "tiny.parquet")
    assert scores.height == len(CHECKPOINTS) * 2 and set(scores["turn"]) == {1, 2}
    assert scores["score"].drop_nulls().is_between(1, 10).all() and scores["judge_reply"].is_not_null().all()
    markdown = (store / "reports" / "tiny" / "report.md").read_text()
    assert markdown.index("## AlpacaEval win rate") > markdown.index("## Training curves")
    assert "## MT-Bench" in markdown and "unjudged" in markdown


def test_unchanged_rerun_makes_no_model_calls(pipeline):
    instance = pipeline["instance"]
    result = materialize(pipeline["defs"], "tiny", instance, run_config=run_config())
    assert result.success
    assert latest_metadata(instance, "new_instructions")["calls_made"] == 0
    assert latest_metadata(instance, "better_responses")["calls_made"] == 0
    scores = latest_metadata(instance, "student_scores")
    assert scores["texts_computed"] == 0 and scores["model_loaded"] is False
    for dataset in CHECKPOINTS:
        assert latest_metadata(instance, AssetKey(f"finetuned_{dataset}"))["reused_existing"] is True
    assert latest_metadata(instance, "evaluation_answers")["generated"] == 0
    assert latest_metadata(instance, "pairwise_verdicts")["calls_made"] == 0
    assert latest_metadata(instance, "alpacaeval_results")["calls_made"] == 0
    assert latest_metadata(instance, "mt_bench_scores")["calls_made"] == 0
    calls = table_cells(latest_metadata(instance, "mt_bench_answers")["calls"])
    assert {c["generated"] for c in calls.values()} == {"0"}


def test_selection_change_reruns_only_what_it_affects(pipeline):
    instance, store = pipeline["instance"], pipeline["store"]
    other_file = store / "raw_samples" / "other.parquet"
    other_before = (other_file.stat().st_mtime_ns, instance.get_latest_materialization_event(AssetKey("raw_samples")))
    before = pl.read_parquet(store / "selected_dataset" / "tiny.parquet")
    result = materialize(pipeline["defs"], "tiny", instance, run_config=run_config(top_k=1))
    assert result.success
    after = pl.read_parquet(store / "selected_dataset" / "tiny.parquet")
    assert after.height == 1 < before.height
    assert latest_metadata(instance, "better_responses")["calls_made"] == 0
    assert latest_metadata(instance, "student_scores")["texts_computed"] == 0
    reused = {d: latest_metadata(instance, AssetKey(f"finetuned_{d}"))["reused_existing"] for d in CHECKPOINTS}
    assert reused == {"selected": False, "random": False, "full": True, "teacher": True}  # only the selection changed
    assert other_file.stat().st_mtime_ns == other_before[0]  # the other source was not touched
    partitions = instance.get_materialized_partitions(AssetKey("raw_samples"))
    assert partitions == {"tiny", "other"}
    records = instance.fetch_materializations(AssetKey("raw_samples"), limit=100).records
    assert sum(r.partition_key == "other" for r in records) == 1


def test_report_is_in_dagster_metadata(pipeline):
    meta = latest_metadata(pipeline["instance"], "experiment_report")
    assert Path(meta["report_html"]).is_file()
    assert "data:image/png;base64" in meta["report"]
    assert {r["dataset"] for r in meta["results"]["training"]} == {*CHECKPOINTS, "base"}  # base: the untrained student


def test_demo_partition_to_selected_dataset_with_the_paper_rule(tmp_path, student_model_dir, dagster_instance):
    """The shipped `demo` partition, raw → selected_dataset, real default models, the paper's rule."""
    from conftest import REPO_ROOT

    model = str(student_model_dir)
    defs = build_definitions(
        sources_file=REPO_ROOT / "sources.yaml",
        storage_dir=tmp_path,
        resources={
            "student": StudentModelResource(model=model),
            "teacher": TransformersChatResource(
                model=model, max_tokens=24, batch_size=20, parse_retries=0, prompts_file=str(SMALL_TEACHER_PROMPTS)
            ),
        },
    )
    config = {"ops": {**demo_ops(), "selected_dataset": {"config": {"min_rows": 0}}}}  # a tiny teacher may win none
    result = materialize(defs, "demo", dagster_instance, upto="selected_dataset", run_config=config)
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    decisions = pl.read_parquet(tmp_path / "sample_decisions" / "demo.parquet")
    selected = pl.read_parquet(tmp_path / "selected_dataset" / "demo.parquet")
    assert decisions.height == 40 and set(decisions["branch"]) <= {"QA", "Q", "A", "ori"}
    assert set(decisions.filter(pl.col("selected"))["chosen_variant"]) <= {"QA", "A"}  # reflected answers only
    assert selected.height == int(decisions["selected"].sum())
    assert ((selected["ifd"] < 1) & (selected["rifd"] < 1)).all()
    branches = table_cells(latest_metadata(dagster_instance, "sample_decisions")["branches"])
    assert sum(int(branches[b]["samples"]) for b in ("QA", "Q", "A", "ori")) == 40


def test_explain_sample_job_tells_the_story_in_the_ui(pipeline):
    """The launchpad's way in: the explain_sample job with a sample_id shows what `srt explain` shows."""
    store, defs, instance = pipeline["store"], pipeline["defs"], pipeline["instance"]
    selected = pl.read_parquet(store / "selected_dataset" / "tiny.parquet")
    sample = selected["sample_id"][0]
    job = defs.get_job_def("explain_sample")
    config = {"ops": {"explain_sample_op": {"config": {"sample_id": sample}}}}
    result = job.execute_in_process(run_config=config, instance=instance)
    assert result.success
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = {k: v.value for k, v in output.step_output_data.metadata.items()}
    assert metadata["in_selected_dataset"] is True and metadata["source"] == "tiny"
    raw = pl.read_parquet(store / "raw_samples" / "tiny.parquet").filter(pl.col("sample_id") == sample)
    assert markdown_text(raw["instruction"][0][:30]) in metadata["raw_samples"]  # shown as escaped text
    assert "| variant | ifd | rifd |" in metadata["student_scores"] and "| branch |" in metadata["sample_decisions"]
    logs = [e.message for e in instance.all_logs(result.run_id) if "== raw row" in (e.message or "")]
    assert logs  # the whole story, readable in the run's log
    bad = job.execute_in_process(
        run_config={"ops": {"explain_sample_op": {"config": {"sample_id": "tiny-0000000000000000"}}}},
        instance=instance,
        raise_on_error=False,
    )
    assert not bad.success

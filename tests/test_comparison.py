"""The training sets side by side and the run's cost summary, on small real tables and a real (ephemeral)
Dagster instance: sizes, variant mix, scores and overlap that follow from the rows, the same samples
in every set, and the calls, tokens and cost each stage's materializations recorded."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import AssetMaterialization, DagsterInstance, Output, build_asset_context

from srt_assets.core.comparison import compare_training_sets, cost_table, side_by_side
from srt_assets.core.datasets import original_training_rows, random_baseline
from srt_assets.core.selection import SelectionRule, select

IDS = [f"demo-{c * 16}" for c in "abcd"]


@pytest.fixture
def tables():
    raw = pl.DataFrame(
        {
            "sample_id": IDS,
            "source": ["demo"] * 4,
            "row_index": list(range(4)),
            "instruction": [f"i{n}" for n in range(4)],
            "input": [""] * 4,
            "output": [f"o{n}" for n in range(4)],
        }
    )
    per_sample = {  # variant: (ifd, rifd); a → QA, b and c → A, d → none (A does not beat ori on r-IFD)
        IDS[0]: {"ori": (0.5, 0.6), "Q": (0.7, 0.8), "A": (0.4, 0.5), "QA": (0.6, 0.7)},
        IDS[1]: {"ori": (0.8, 0.6), "Q": (0.7, 0.8), "A": (0.3, 0.5), "QA": (0.6, 0.7)},
        IDS[2]: {"ori": (0.8, 0.6), "Q": (0.7, 0.8), "A": (0.4, 0.5), "QA": (0.6, 0.7)},
        IDS[3]: {"ori": (0.9, 0.3), "Q": (0.1, 0.8), "A": (0.2, 0.9), "QA": (0.3, 0.7)},
    }
    scores = pl.DataFrame(
        [{"sample_id": s, "variant": v, "ifd": ifd, "rifd": rifd} for s, per in per_sample.items()
         for v, (ifd, rifd) in per.items()]
    )  # fmt: skip
    decisions = select(IDS, scores, SelectionRule())
    full = original_training_rows(raw)
    chosen = decisions.filter(pl.col("selected")).select("sample_id", pl.col("chosen_variant").alias("variant"))
    selected = full.drop("variant").join(chosen, on="sample_id").with_columns(pl.col("output") + "-new")
    return raw, decisions, selected.select(full.columns), random_baseline(full, chosen.height, seed=1), full


def test_the_comparison_follows_from_the_rows(tables):
    raw, decisions, selected, drawn, full = tables
    sets = {"selected_dataset": selected, "baseline_random": drawn, "baseline_full": full}
    table = compare_training_sets(sets, decisions, raw.height)
    rows = {r["training_set"]: r for r in table.iter_rows(named=True)}
    assert selected.height == drawn.height == 3  # QA, A, A: the fourth sample's A loses on r-IFD
    assert rows["selected_dataset"]["rows"] == 3 and rows["baseline_full"]["share_of_source"] == 1.0
    assert (rows["selected_dataset"]["rows_QA"], rows["selected_dataset"]["rows_A"]) == (1, 2)
    assert rows["baseline_full"]["rows_ori"] == 4 and rows["baseline_full"]["rows_QA"] == 0
    # the scores are those of the variant each row is: the full set's are the originals'
    assert rows["baseline_full"]["ifd_mean"] == pytest.approx((0.5 + 0.8 + 0.8 + 0.9) / 4)
    chosen_ifd = decisions.filter(pl.col("selected"))["chosen_ifd"]
    assert rows["selected_dataset"]["ifd_p50"] == pytest.approx(chosen_ifd.median())
    shared = len(set(selected["sample_id"]) & set(drawn["sample_id"]))
    assert f"baseline_random: {shared} ({shared / 3:.0%})" in rows["selected_dataset"]["overlap"]
    assert "baseline_full: 3 (100%)" in rows["selected_dataset"]["overlap"]

    pairs = side_by_side(sets, raw, samples=2)
    first = pairs.row(0, named=True)
    assert pairs["sample_id"].to_list() == selected["sample_id"].head(2).to_list()
    assert first["original_output"] + "-new" == first["selected_dataset: output"]
    assert first["baseline_full: output"] == first["original_output"]
    in_random = first["sample_id"] in set(drawn["sample_id"])
    assert (first["baseline_random: output"] == "not in the set") is not in_random


def test_training_sets_asset(tables):
    from srt_assets.defs.selection.comparison import training_sets

    raw, decisions, selected, drawn, full = tables
    teacher = full.with_columns(pl.lit("A").alias("variant"), pl.col("output") + "-teacher")
    output = training_sets(build_asset_context(partition_key="demo"), raw, decisions, selected, drawn, full, teacher)
    assert output.value["training_set"].to_list() == [
        "selected_dataset", "baseline_random", "baseline_full", "baseline_teacher"
    ]  # fmt: skip
    overlap = output.metadata["overlap"].value
    assert "| baseline\\_full | 3 | 3 | 4 | 4 |" in overlap  # it holds every sample of the others
    assert output.metadata["samples_side_by_side"].value.count("explain_sample config") == 3


def test_the_teacher_set_takes_every_samples_most_rewritten_real_candidate(tables):
    """QA before A before Q; a failed reflection or a copy is no rewrite, and a sample without any
    keeps its original text. No student score is read."""
    from srt_assets.core.datasets import teacher_training_rows

    raw = tables[0]
    variants = pl.DataFrame(
        [(IDS[0], v, f"i-{v}", "", f"o-{v}") for v in ("ori", "Q", "A", "QA")]
        + [(IDS[1], v, f"i-{v}", "", f"o-{v}") for v in ("ori", "Q", "A", "QA")]
        + [(IDS[2], v, f"i-{v}", "", f"o-{v}") for v in ("ori", "Q")]
        + [(IDS[3], "ori", "i", "", "o")],
        schema=["sample_id", "variant", "instruction", "input", "output"],
        orient="row",
    )
    unavailable = pl.DataFrame(
        [(IDS[1], "QA", "parse_failed"), (IDS[2], "Q", "copy of ori")],
        schema=["sample_id", "variant", "why"],
        orient="row",
    )
    rows = teacher_training_rows(raw, variants, unavailable)
    assert rows["sample_id"].to_list() == IDS  # one row per sample, in source order
    assert rows["variant"].to_list() == ["QA", "A", "ori", "ori"]
    assert rows["output"][0] == "o-QA" and rows["row_index"].to_list() == [0, 1, 2, 3]


def test_run_costs_add_up_what_each_stage_recorded():
    from srt_assets.defs.evaluation.costs import run_costs
    from srt_assets.paths import sources_file
    from srt_assets.resources import SourceCatalogResource

    with DagsterInstance.ephemeral() as instance:
        events = [
            ("new_instructions", "demo", {"calls_made": 40, "cache_hits": 0, "tokens_in": 4000, "tokens_out": 900,
                                          "estimated_cost": 0.25}),
            ("new_instructions", "demo", {"calls_made": 0, "cache_hits": 40, "tokens_in": 0, "tokens_out": 0,
                                          "estimated_cost": 0.0}),  # the latest: a rerun served from the cache
            ("better_responses", "demo", {"calls_made": 80, "cache_hits": 2, "tokens_in": 9000, "tokens_out": 3000,
                                          "estimated_cost": 0.5}),
            ("student_scores", "demo", {"texts_computed": 480, "texts_from_cache": 20}),
            ("pairwise_verdicts", "demo", {"calls_made": 12, "cache_hits": 0, "tokens_in": 600, "tokens_out": 60,
                                           "estimated_cost": 0.01}),  # a judge's tokens count too
            ("better_responses", "alpaca", {"calls_made": 999, "cache_hits": 0}),  # another source
        ]  # fmt: skip
        for stage, partition, metadata in events:
            instance.report_runless_asset_event(AssetMaterialization(stage, partition=partition, metadata=metadata))
        sources = SourceCatalogResource(sources_file=str(sources_file()))
        output = run_costs(build_asset_context(partition_key="demo", instance=instance), sources=sources)
    assert isinstance(output, Output)
    by_stage = {r["stage"]: r for r in output.value.iter_rows(named=True)}
    assert by_stage["new_instructions"]["calls_made"] == 0 and by_stage["new_instructions"]["cache_hits"] == 40
    assert by_stage["student_scores"]["calls_made"] == 480 and by_stage["student_scores"]["tokens_in"] is None
    assert by_stage["total"]["calls_made"] == 0 + 80 + 480 + 12 and by_stage["total"]["cache_hits"] == 62
    assert by_stage["total"]["estimated_cost"] == pytest.approx(0.51) and by_stage["total"]["tokens_in"] == 9600
    assert output.metadata["total_calls_made"].value == 572 and "mt_bench_scores" not in by_stage
    assert output.metadata["total_tokens_out"].value == 3060 and "total_partitions" not in output.metadata
    assert cost_table([]).is_empty()


def test_the_report_shows_the_comparison_and_the_costs(tables, tmp_path):
    """Both parts are registered with experiment_report and render from their tables."""
    from srt_assets.defs.evaluation import report
    from srt_assets.defs.report_parts import ReportInputs
    from srt_assets.report import write_report
    from srt_assets.resources import StorageResource

    raw, decisions, selected, drawn, full = tables
    sets = {"selected_dataset": selected, "baseline_random": drawn, "baseline_full": full}
    costs = cost_table([{"stage": "new_instructions", "calls_made": 7, "cache_hits": 1, "estimated_cost": 0.125}])
    tables_by_name = {"training_sets": compare_training_sets(sets, decisions, raw.height), "run_costs": costs}
    parts = [p for p in report.REPORT_PARTS if set(p.reads) <= set(tables_by_name)]
    assert [p.title for p in parts] == ["Training sets side by side", "What the model calls cost"]
    storage = StorageResource(base_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    inputs = ReportInputs("demo", storage, tables_by_name)
    written = write_report("demo", [s for p in parts for s in p.render(inputs)], tmp_path / "report")
    text = written.markdown_path.read_text()
    assert "## Training sets side by side" in text and "baseline\\_random" in text
    assert "## What the model calls cost" in text and "| total | 1 | 7 | 1 |" in text
    assert written.results["training_set_comparison"][0]["rows"] == selected.height

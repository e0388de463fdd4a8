"""Stage 8, the report: what the comparison rests on, then every evaluation's result, in one page
shown in the UI and written as Markdown and HTML with figures."""

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from srt_assets.core.candidate_quality import FLAGS
from srt_assets.core.training import read_manifest
from srt_assets.defs.common import json_value
from srt_assets.defs.evaluation.leaderboards import alpaca_eval_section, mt_bench_section
from srt_assets.defs.training.assets import CHECKPOINT_KEYS, TRAINING_SETS, checkpoint_dir
from srt_assets.partitions import SOURCES
from srt_assets.report import Section, build_report
from srt_assets.resources import StorageResource


def diagnostics_section(diagnostics: pl.DataFrame) -> Section:
    return Section(
        "Can the student judge? (student_diagnosis)",
        "How often the student's IFD and r-IFD prefer a true instruction–response pair to one made worse on "
        "purpose (0.5 is chance, 1 always). Near chance on the swaps, the student cannot tell good data from "
        "noise, and its selection is a coin toss.",
        diagnostics.select("probe", "statistic", "auc", "ci_low", "ci_high", "pairs"),
    )


def quality_section(*candidates: pl.DataFrame) -> Section:
    """Teacher rewrites per variant: usable, parse or call failures, and each quality flag raised."""
    table = pl.concat([c.select("variant", "status", "quality_flags") for c in candidates])
    rows = []
    for variant in sorted(table["variant"].unique()):
        part = table.filter(pl.col("variant") == variant)
        ok = part.filter(pl.col("status") == "ok")
        flagged = ok.filter(pl.col("quality_flags").list.len() > 0)
        counts = dict(flagged.select(pl.col("quality_flags").explode()).group_by("quality_flags").len().iter_rows())
        rows.append(
            {"variant": variant, "rows": part.height, "ok": ok.height, "ok_and_unflagged": ok.height - flagged.height}
            | {name: counts.get(name, 0) for name in FLAGS}
        )
    return Section(
        "Teacher rewrites and their quality flags",
        "Per variant: rows, replies that parsed, and those that also raised no quality flag; then how many "
        "candidates raised each flag (core/candidate_quality.py). A candidate with a rejecting flag is a "
        "failed reflection for the selection.",
        pl.DataFrame(rows),
    )


@asset(partitions_def=SOURCES, group_name="evaluation", kinds={"polars"}, deps=CHECKPOINT_KEYS)
def experiment_report(
    context: AssetExecutionContext,
    pairwise_verdicts: pl.DataFrame,
    reference_loss: pl.DataFrame,
    student_diagnosis: pl.DataFrame,
    new_instructions: pl.DataFrame,
    better_responses: pl.DataFrame,
    alpacaeval_results: pl.DataFrame,
    mt_bench_scores: pl.DataFrame,
    storage: StorageResource,
) -> MaterializeResult:
    """What the comparison rests on (can the student judge, how many rewrites were usable), then
    selected vs random vs full: win/tie/lose per test set, reference-answer loss, training curves;
    ending with AlpacaEval win rates and MT-Bench scores; shown here and written as Markdown and
    HTML with PNG figures."""
    source = context.partition_key
    manifests = {d: read_manifest(checkpoint_dir(storage, source, d)) for d in TRAINING_SETS}
    extra = [diagnostics_section(student_diagnosis), quality_section(new_instructions, better_responses)]
    closing = [alpaca_eval_section(alpacaeval_results), mt_bench_section(mt_bench_scores)]
    report = build_report(
        source, pairwise_verdicts, reference_loss, manifests, storage.reports_dir / source, extra, closing
    )
    return MaterializeResult(
        metadata={
            "report_markdown": MetadataValue.path(str(report.markdown_path)),
            "report_html": MetadataValue.path(str(report.html_path)),
            "report": MetadataValue.md(report.inline_markdown),
            "results": json_value(report.results),
        }
    )

"""Stage 8, the report: every stage's sections in reading order (what the comparison rests on, the
comparison, the field's benchmarks), shown in the UI and written as Markdown and HTML with figures.

A new metric adds one registration line to ``REPORT_PARTS``: the assets it reads and the function that
makes its sections; ``experiment_report`` reads whatever the parts name."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import polars as pl
from dagster import AssetExecutionContext, AssetIn, MaterializeResult, MetadataValue, asset

from srt_assets.core.training import read_manifest
from srt_assets.defs.common import json_value
from srt_assets.defs.evaluation.leaderboards import alpaca_eval_section, mt_bench_section
from srt_assets.defs.evaluation.pairwise import pairwise_sections, training_sections
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.student.assets import diagnostics_section
from srt_assets.defs.teacher.assets import quality_section
from srt_assets.defs.training.assets import CHECKPOINT_KEYS, TRAINING_SETS, checkpoint_dir
from srt_assets.report import Section, write_report
from srt_assets.resources import StorageResource


@dataclass(frozen=True)
class ReportInputs:
    """What a report part may read: the partition's tables it named, and the storage."""

    source: str
    storage: StorageResource
    tables: Mapping[str, pl.DataFrame]

    def manifests(self) -> dict[str, dict | None]:
        """Each checkpoint's training manifest (None where it is not trained yet)."""
        return {d: read_manifest(checkpoint_dir(self.storage, self.source, d)) for d in TRAINING_SETS}


@dataclass(frozen=True)
class ReportPart:
    reads: tuple[str, ...]  # the assets whose tables the part reads
    sections: Callable[[ReportInputs], list[Section]]


REPORT_PARTS = (
    ReportPart(("student_diagnosis",), lambda i: [diagnostics_section(i.tables["student_diagnosis"])]),
    ReportPart(
        ("new_instructions", "better_responses"),
        lambda i: [quality_section(i.tables["new_instructions"], i.tables["better_responses"])],
    ),
    ReportPart(("pairwise_verdicts",), lambda i: pairwise_sections(i.tables["pairwise_verdicts"])),
    ReportPart(("reference_loss",), lambda i: training_sections(i.tables["reference_loss"], i.manifests())),
    ReportPart(("alpacaeval_results",), lambda i: [alpaca_eval_section(i.tables["alpacaeval_results"])]),
    ReportPart(("mt_bench_scores",), lambda i: [mt_bench_section(i.tables["mt_bench_scores"])]),
)


@asset(
    partitions_def=SOURCES,
    group_name="evaluation",
    kinds={"polars"},
    deps=CHECKPOINT_KEYS,
    ins={name: AssetIn(name) for part in REPORT_PARTS for name in part.reads},
)
def experiment_report(
    context: AssetExecutionContext, storage: StorageResource, **tables: pl.DataFrame
) -> MaterializeResult:
    """What the comparison rests on (can the student judge, how many rewrites were usable), then
    selected vs random vs full: win/tie/lose per test set, reference-answer loss, training curves;
    ending with AlpacaEval win rates and MT-Bench scores; shown here and written as Markdown and
    HTML with PNG figures."""
    source = context.partition_key
    inputs = ReportInputs(source, storage, tables)
    report = write_report(
        source, [s for part in REPORT_PARTS for s in part.sections(inputs)], storage.reports_dir / source
    )
    return MaterializeResult(
        metadata={
            "report_markdown": MetadataValue.path(str(report.markdown_path)),
            "report_html": MetadataValue.path(str(report.html_path)),
            "report": MetadataValue.md(report.inline_markdown),
            "results": json_value(report.results),
        }
    )

"""Stage 8, the report: every stage's sections in reading order (what the comparison rests on, the
comparison, the field's benchmarks), shown in the UI and written as Markdown and HTML with figures.

The parts come from the stages that declare them (``REPORT_PARTS`` beside their assets) and from the
registered metrics (``metrics.METRICS``). A part's tables are optional inputs: a source whose
AlpacaEval was never run still gets its report, with a line naming what to materialize."""

import polars as pl
from dagster import AssetExecutionContext, AssetIn, MaterializeResult, MetadataValue, asset

from srt_assets.defs.common import json_value
from srt_assets.defs.evaluation import costs
from srt_assets.defs.evaluation.metrics import METRICS
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportInputs, ReportPart
from srt_assets.defs.selection import comparison
from srt_assets.defs.student import assets as student_assets
from srt_assets.defs.teacher import assets as teacher_assets
from srt_assets.defs.training.assets import CHECKPOINT_KEYS
from srt_assets.io_managers import OPTIONAL_INPUT
from srt_assets.report import write_report
from srt_assets.resources import StorageResource

REPORT_PARTS: tuple[ReportPart, ...] = (
    *student_assets.REPORT_PARTS,
    *teacher_assets.REPORT_PARTS,
    *comparison.REPORT_PARTS,
    *(part for metric in METRICS for part in metric.REPORT_PARTS),
    *costs.REPORT_PARTS,
)


def missing_note(missing: list[str]) -> str:
    """Which inputs are not materialized, as a sentence and a list a person reads (not "[]")."""
    if not missing:
        return "Every input of the report is materialized."
    return "Not materialized for this source:\n\n" + "\n".join(f"- {name}" for name in missing)


@asset(
    partitions_def=SOURCES,
    group_name="evaluation",
    kinds={"polars"},
    deps=CHECKPOINT_KEYS,
    ins={name: AssetIn(name, metadata={OPTIONAL_INPUT: True}) for part in REPORT_PARTS for name in part.reads},
)
def experiment_report(
    context: AssetExecutionContext, storage: StorageResource, **tables: pl.DataFrame | None
) -> MaterializeResult:
    """What the comparison rests on (can the student judge, how many rewrites were usable, the
    training sets side by side), then selected vs random vs full: win/tie/lose per test set,
    reference-answer loss, training curves; AlpacaEval win rates, MT-Bench scores and the Open LLM
    Leaderboard v1 tasks; ending with what the model calls cost. Shown here and written as Markdown
    and HTML with PNG figures (the HTML also as a link); parts whose assets are not materialized for
    the source say so."""
    source = context.partition_key
    inputs = ReportInputs(source, storage, tables)
    missing = sorted(name for name, table in tables.items() if table is None)
    report = write_report(
        source, [s for part in REPORT_PARTS for s in part.render(inputs)], storage.reports_dir / source
    )
    return MaterializeResult(
        metadata={
            "report": MetadataValue.md(report.inline_markdown),
            "not_materialized": MetadataValue.md(missing_note(missing)),
            "results": json_value(report.results),
            # a link to open (a browser opens a file:// link pasted into its address bar), paths last
            "report_link": MetadataValue.url(report.html_path.resolve().as_uri()),
            "report_markdown": MetadataValue.path(str(report.markdown_path)),
            "report_html": MetadataValue.path(str(report.html_path)),
        }
    )

"""The training sets side by side, one click from the selection: what each set holds (size, variant
mix, the student's scores, overlap with the others) and the same samples as each set trains on them."""

import polars as pl
from dagster import AssetExecutionContext, MetadataValue, Output, asset

from srt_assets.core.comparison import COMPARISON_COLUMNS, COMPARISON_SCHEMA, compare_training_sets, side_by_side
from srt_assets.core.datasets import TRAINING_SETS
from srt_assets.defs.common import column_schema
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportInputs, ReportPart
from srt_assets.plots import full_rows_markdown, markdown_table
from srt_assets.report import Section


def overlap_matrix(sets: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Samples each pair of sets shares (the diagonal: the set's own samples)."""
    ids = {name: set(rows["sample_id"].to_list()) for name, rows in sets.items()}
    return pl.DataFrame(
        [{"training_set": a, **{b: len(ids[a] & ids[b]) for b in ids}} for a in ids],
        schema={"training_set": pl.String(), **dict.fromkeys(ids, pl.Int64())},
    )


@asset(
    partitions_def=SOURCES,
    group_name="selection",
    kinds={"polars"},
    metadata={"dagster/column_schema": column_schema(COMPARISON_SCHEMA, COMPARISON_COLUMNS)},
)
def training_sets(
    context: AssetExecutionContext,
    raw_samples: pl.DataFrame,
    sample_decisions: pl.DataFrame,
    selected_dataset: pl.DataFrame,
    baseline_random: pl.DataFrame,
    baseline_full: pl.DataFrame,
    baseline_teacher: pl.DataFrame,
) -> Output[pl.DataFrame]:
    """Selected vs random vs full vs all teacher rewrites in one table: size, variant mix, score
    distributions and overlap, with a few samples as each set trains on them, so "better data, not less
    data" and "the student's choice, not the teacher alone" can be checked."""
    given = {
        "selected_dataset": selected_dataset,
        "baseline_random": baseline_random,
        "baseline_full": baseline_full,
        "baseline_teacher": baseline_teacher,
    }
    sets = {name: given[name] for name in TRAINING_SETS.values()}  # the selected set first
    table = compare_training_sets(sets, sample_decisions, raw_samples.height)
    rows = side_by_side(sets, raw_samples)
    context.log.info(
        "training sets: " + ", ".join(f"{r['training_set']} {r['rows']} rows" for r in table.iter_rows(named=True))
    )
    return Output(
        table,
        metadata={
            # the overlap has its own matrix below; without it the table fits the UI's column
            "comparison": MetadataValue.md(markdown_table(table.drop("overlap", "ifd_mean", "rifd_mean"))),
            "overlap": MetadataValue.md(markdown_table(overlap_matrix(sets))),
            "samples_side_by_side": MetadataValue.md(full_rows_markdown(rows)),
        },
    )


def comparison_sections(inputs: ReportInputs) -> list[Section]:
    table = inputs.tables["training_sets"]
    note = (
        "What each model is trained on: size, variant mix (ori is the original text), the student's median and "
        "mean IFD / reverse IFD of the rows, and the samples each set shares with the others. The random "
        "baseline has the selected set's size, so a win over it is better data, not less data; the teacher set holds "
        "every rewrite without the student's choice."
    )
    return [Section("Training sets side by side", note, table, key="training_set_comparison")]


REPORT_PARTS = [ReportPart("Training sets side by side", ("training_sets",), comparison_sections)]

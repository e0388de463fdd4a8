"""What the run's model calls cost, per source: calls made, cache hits, tokens and estimated money per
stage and in total, read from the latest materialization of each stage partition (each stage's own
metadata is the record; this asset only adds it up where a person looks for it)."""

import polars as pl
from dagster import AssetExecutionContext, AssetKey, AssetRecordsFilter, MetadataValue, Output, asset

from srt_assets.core.comparison import COST_COLUMNS, COST_SCHEMA, cost_table
from srt_assets.defs.common import column_schema
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportInputs, ReportPart
from srt_assets.partitions import catalog_partitioning
from srt_assets.plots import markdown_table
from srt_assets.report import Section
from srt_assets.resources import SourceCatalogResource

CHAT_FIGURES = {name: name for name in ("calls_made", "cache_hits", "tokens_in", "tokens_out", "estimated_cost")}
# stage → (whether it is a row stage, partitioned per source x shard; cost column → its metadata key)
COST_STAGES: dict[str, tuple[bool, dict[str, str]]] = {
    "new_instructions": (True, CHAT_FIGURES),
    "better_responses": (True, CHAT_FIGURES),
    "student_scores": (True, {"calls_made": "texts_computed", "cache_hits": "texts_from_cache"}),
    "pairwise_verdicts": (False, CHAT_FIGURES),
    "alpacaeval_results": (False, CHAT_FIGURES),
    "mt_bench_scores": (False, CHAT_FIGURES),
}


def stage_records(context: AssetExecutionContext, sources: SourceCatalogResource) -> list[dict]:
    """One record per materialized partition of each model stage for this source, with its figures."""
    source = context.partition_key
    layout = catalog_partitioning(sources.catalog)
    row_keys = [k for k in layout.row_partitions.get_partition_keys() if layout.source_name(k) == source]
    records = []
    for stage, (row_stage, figures) in COST_STAGES.items():
        for key in row_keys if row_stage else [source]:
            found = context.instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(stage), asset_partitions=[key]), limit=1
            ).records
            if not found or found[0].asset_materialization is None:
                continue
            metadata = found[0].asset_materialization.metadata
            values = {column: metadata[name].value for column, name in figures.items() if name in metadata}
            records.append({"stage": stage, **values})
    return records


@asset(
    partitions_def=SOURCES,
    group_name="evaluation",
    kinds={"polars"},
    deps=[AssetKey(stage) for stage in COST_STAGES],
    metadata={"dagster/column_schema": column_schema(COST_SCHEMA, COST_COLUMNS)},
)
def run_costs(context: AssetExecutionContext, sources: SourceCatalogResource) -> Output[pl.DataFrame]:
    """Calls, cache hits, tokens and estimated cost of every model stage of this source (teacher,
    student, judges) and their total, from each stage partition's latest materialization."""
    table = cost_table(stage_records(context, sources))
    total = table.filter(pl.col("stage") == "total").to_dicts()
    # the total row's figures; its partitions count stage partitions, no figure a person adds up
    row = total[0] if total else {}
    figures = {k: v for k, v in row.items() if k not in ("stage", "partitions") and v is not None}
    context.log.info(f"model calls of source '{context.partition_key}': {figures or 'none recorded yet'}")
    return Output(
        table,
        metadata={
            **{f"total_{k}": round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
            "costs": MetadataValue.md(markdown_table(table)),
        },
    )


def cost_sections(inputs: ReportInputs) -> list[Section]:
    note = (
        "Model calls per stage for this source, from each stage partition's latest materialization: calls made, "
        "calls answered from the cache, tokens and the estimated cost at the backend's configured price (local "
        "models cost 0; a blank cell is a figure the stage does not report)."
    )
    return [Section("What the model calls cost", note, inputs.tables["run_costs"], key="run_costs")]


REPORT_PARTS = [ReportPart("What the model calls cost", ("run_costs",), cost_sections)]

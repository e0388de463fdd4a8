"""Stage 1: raw instruction–response pairs per source, with rejects and blocking quality gates."""

import time

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    MetadataValue,
    Output,
    PartitionsDefinition,
    multi_asset,
)

from srt_assets.assets.common import SOURCE_PARTITIONS_DOC, markdown_table, to_check_results
from srt_assets.core.quality import TableContract, ratio_check, validate_table
from srt_assets.core.raw import RAW_SCHEMA, length_stats, load_source
from srt_assets.resources import SourceCatalogResource

RAW_CONTRACT = TableContract(
    schema=RAW_SCHEMA,
    not_null=tuple(RAW_SCHEMA),
    not_blank=("instruction", "output"),
    unique=("sample_id",),
)
RAW_CHECKS = [*RAW_CONTRACT.check_names(), "reject_ratio_below_bound"]


def build_raw_assets(partitions_def: PartitionsDefinition):
    """The raw-stage assets over the given source partitions (an asset factory, so tests and
    deployments can bring their own source catalog)."""

    @multi_asset(
        outs={
            "raw_samples": AssetOut(
                description="Instruction–response pairs of one source, normalized to one schema, with a "
                "stable `sample_id` (source + content hash) that every later stage keeps. " + SOURCE_PARTITIONS_DOC,
                kinds={"polars", "parquet"},
            ),
            "raw_rejects": AssetOut(
                description="Rows of the source that could not be used, with file, row, field and reason.",
                kinds={"polars", "parquet"},
            ),
        },
        partitions_def=partitions_def,
        group_name="raw",
        check_specs=[
            AssetCheckSpec(name, asset="raw_samples", blocking=True, description=name.replace("_", " "))
            for name in RAW_CHECKS
        ],
    )
    def raw_source_tables(context: AssetExecutionContext, sources: SourceCatalogResource):
        """Read one source file, split it into usable samples and rejects, and gate the samples."""
        spec = sources.source(context.partition_key)
        started = time.perf_counter()
        samples, rejects = load_source(spec)
        elapsed = time.perf_counter() - started
        rows_read = samples.height + rejects.height
        reasons = dict(rejects.group_by("reason").len().sort("reason").iter_rows()) if rejects.height else {}
        context.log.info(
            f"source '{spec.name}': {rows_read} rows read from {spec.path} in {elapsed:.1f}s, "
            f"{samples.height} kept, {rejects.height} rejected {reasons or ''}"
        )
        yield Output(
            samples,
            output_name="raw_samples",
            metadata={
                "source_file": MetadataValue.path(str(spec.path)),
                "rows_read": rows_read,
                "row_count": samples.height,
                "rejected": rejects.height,
                "rejects_by_reason": MetadataValue.json(reasons),
                "length_chars": MetadataValue.json(length_stats(samples)),
                "with_input": int((samples.get_column("input") != "").sum()),
                "preview": MetadataValue.md(markdown_table(samples.head(5))),
                "load_seconds": round(elapsed, 2),
            },
        )
        yield Output(
            rejects,
            output_name="raw_rejects",
            metadata={
                "row_count": rejects.height,
                "rejects_by_reason": MetadataValue.json(reasons),
                "preview": MetadataValue.md(markdown_table(rejects.head(10))),
            },
        )
        outcomes = validate_table(samples, RAW_CONTRACT, suite_name=f"raw_samples_{spec.name}")
        outcomes.append(
            ratio_check("reject_ratio_below_bound", rejects.height, rows_read, spec.max_reject_ratio, "rejected-row")
        )
        yield from to_check_results("raw_samples", outcomes)

    return [raw_source_tables]

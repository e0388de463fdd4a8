"""Stage 1: the source files (observed), and raw instruction–response pairs per source with their
rejects, behind blocking quality gates."""

import time
from datetime import UTC, datetime

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetObservation,
    AssetOut,
    DataVersionsByPartition,
    MetadataValue,
    Output,
    multi_asset,
    observable_source_asset,
)

from srt_assets.core.files import StagedParquet, discarded_on_failure
from srt_assets.core.from_files import matched_keys
from srt_assets.core.quality import TableContract, ratio_check, validate_written_table
from srt_assets.core.raw import (
    RAW_BLOCK_ROWS,
    RAW_COLUMNS,
    RAW_SCHEMA,
    REJECT_COLUMNS,
    REJECT_SCHEMA,
    STREAMING,
    length_stats,
    read_source,
)
from srt_assets.core.sources import SourceCatalog, SourceSpec
from srt_assets.defs.common import SOURCE_PARTITIONS_DOC, blocking_checks, column_schema, to_check_results
from srt_assets.defs.partitions import LOADED_CATALOG, SOURCES
from srt_assets.plots import full_rows_markdown, mapping_table, preview_markdown
from srt_assets.resources import SourceCatalogResource, StorageResource

RAW_CONTRACT = TableContract(
    schema=RAW_SCHEMA,
    not_null=tuple(RAW_SCHEMA),
    not_blank=("instruction", "output"),
    unique=("sample_id",),
)
RAW_CHECKS = {
    **RAW_CONTRACT.check_descriptions(),
    "reject_ratio_below_bound": "the share of rejected rows is at most the source's max_reject_ratio",
}
DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster reads an observation's data version from


def catalog_table(catalog: SourceCatalog) -> str:
    """The sources as a Markdown table (name, description, licence, file, whether it exists now)."""
    rows = []
    for name in catalog.names:
        spec = catalog.get(name)
        hint = f" (set `{spec.path_env}`)" if spec.path_env else ""
        present = "yes" if spec.path.is_file() else f"**missing**{hint}"
        rows.append(f"| `{name}` | {spec.description or '—'} | {spec.license or '—'} | `{spec.path}` | {present} |")
    return "\n".join(["| source | description | licence | file | file present |", "|---|---|---|---|---|", *rows])


def source_metadata(spec: SourceSpec) -> dict:
    """What a user wants to know about a source before and after reading it."""
    present = spec.path.is_file()
    metadata = {
        "file_present": present,
        "description": spec.description or "—",
        "license": spec.license or "—",
        "format": spec.format,
        "fields": MetadataValue.md(mapping_table(spec.fields.as_dict(), "role", "record key")),
        "limit": str(spec.limit) if spec.limit else "all rows",
    }
    if present:
        stat = spec.path.stat()
        metadata["bytes"] = stat.st_size
        metadata["modified"] = MetadataValue.timestamp(stat.st_mtime)
    else:
        metadata["how_to_fix"] = str(spec.missing_message())
    return metadata | {"file": MetadataValue.path(str(spec.path))}  # paths last: they run off the edge


def file_version(spec: SourceSpec) -> str:
    """A cheap data version: size and modification time (hashing a 10 GB file on every observation
    would not be), or 'missing'. With ``only_matched`` the matched files choose the rows: theirs too."""
    files = [spec.path, *(file.path for file in spec.matched_files if spec.only_matched)]
    if not all(path.is_file() for path in files):
        return "missing"
    return "+".join(f"{stat.st_size}-{stat.st_mtime_ns}" for stat in (path.stat() for path in files))


def source_files_description(catalog: SourceCatalog) -> str:
    return (
        "The source files of sources.yaml, one partition each. Observe them (the asset's **Observe** button) "
        "to record per partition whether the file is there, its size and time, its licence and description, "
        "with a data version (size and time) that changes when the file does.\n\n"
        f"Catalog `{catalog.file}` when the code location loaded:\n\n{catalog_table(catalog)}"
    )


@observable_source_asset(
    partitions_def=SOURCES,
    group_name="raw",
    description=source_files_description(LOADED_CATALOG),
)
def source_files(context, sources: SourceCatalogResource) -> DataVersionsByPartition:
    """Observe every source file: its data version and its details, per partition."""
    current = sources.catalog
    for name in current.names:
        spec = current.get(name)
        version = file_version(spec)
        context.log_event(
            AssetObservation(
                asset_key="source_files",
                partition=name,
                metadata=source_metadata(spec),
                tags={DATA_VERSION_TAG: version},
            )
        )
        context.log.info(f"source '{name}': {spec.path} ({'present' if version != 'missing' else 'MISSING'})")
    return DataVersionsByPartition({})  # the observations above carry the versions and the details


@multi_asset(
    name="raw_samples",
    outs={
        "raw_samples": AssetOut(
            description="Instruction–response pairs of one source, normalized to one schema, with a "
            "stable `sample_id` (source + content hash) that every later stage keeps. " + SOURCE_PARTITIONS_DOC,
            kinds={"polars", "parquet"},
            metadata={"dagster/column_schema": column_schema(RAW_SCHEMA, RAW_COLUMNS)},
            is_required=False,
        ),
        "raw_rejects": AssetOut(
            description="Rows of the source that could not be used, with file, row, field and reason.",
            kinds={"polars", "parquet"},
            metadata={"dagster/column_schema": column_schema(REJECT_SCHEMA, REJECT_COLUMNS)},
            is_required=False,
        ),
    },
    deps=[source_files],
    partitions_def=SOURCES,
    group_name="raw",
    can_subset=True,
    check_specs=blocking_checks("raw_samples", RAW_CHECKS, SOURCES),
)
def raw_samples(context: AssetExecutionContext, sources: SourceCatalogResource, storage: StorageResource):
    """Read one source file into usable samples and rejects, and gate the samples. Either table
    can be materialized alone; both come from the same reading of the file, written a block at a
    time (``read_source``): memory follows the block, not the file."""
    spec = sources.source(context.partition_key)
    started = time.perf_counter()
    only_keys = matched_keys(spec) if spec.only_matched else None
    with (
        storage.table_writer("raw_samples", context.partition_key, RAW_SCHEMA) as samples_writer,
        storage.table_writer("raw_rejects", context.partition_key, REJECT_SCHEMA) as rejects_writer,
    ):
        for samples, rejects in read_source(spec, only_keys, RAW_BLOCK_ROWS):
            samples_writer.write(samples)
            rejects_writer.write(rejects)
        staged = {"raw_samples": samples_writer.finish(), "raw_rejects": rejects_writer.finish()}
    with discarded_on_failure(*staged.values()):
        yield from report_raw(context, spec, staged, time.perf_counter() - started, only_keys)


def report_raw(
    context: AssetExecutionContext,
    spec: SourceSpec,
    staged: dict[str, StagedParquet],
    elapsed: float,
    only_keys: set | None,
):
    """The selected tables with their metadata, then the blocking checks: all read from the staged
    files, a few columns at a time, before any is moved into place."""
    samples, rejects = staged["raw_samples"].scan(), staged["raw_rejects"].scan()
    kept, rejected = staged["raw_samples"].rows, staged["raw_rejects"].rows
    rows_read = kept + rejected
    if only_keys is not None:
        files = ", ".join(str(file.path) for file in spec.matched_files)
        context.log.info(f"only_matched: read the rows of {spec.path} that {files} hold ({len(only_keys)} keys)")
    by_reason = rejects.group_by("reason").len().sort("reason")
    reasons = dict(by_reason.collect(engine=STREAMING).iter_rows()) if rejected else {}
    context.log.info(
        f"source '{spec.name}': {rows_read} rows read from {spec.path} in {elapsed:.1f}s, "
        f"{kept} kept, {rejected} rejected {reasons or ''}"
    )
    selected = {key.to_user_string() for key in context.selected_asset_keys}  # also when called directly
    metadata = {
        "raw_samples": samples_metadata(samples, kept, rows_read, reasons, elapsed) | source_metadata(spec),
        "raw_rejects": {
            "rejects_by_reason": MetadataValue.md(mapping_table(reasons, "reason", "rows")),
            "preview": MetadataValue.md(preview_markdown(rejects.head(10).collect(), rejected)),
        },
    }
    outcomes = []
    if context.selected_asset_check_keys:
        outcomes = validate_written_table(samples, RAW_CONTRACT, f"raw_samples_{spec.name}", RAW_BLOCK_ROWS)
        outcomes.append(
            ratio_check("reject_ratio_below_bound", rejected, rows_read, spec.max_reject_ratio, "rejected-row")
        )
    for name in ("raw_samples", "raw_rejects"):
        if name in selected:
            yield Output(staged[name], output_name=name, metadata=metadata[name])
        else:
            staged[name].discard()
    yield from to_check_results("raw_samples", outcomes)


def samples_metadata(samples: pl.LazyFrame, kept: int, rows_read: int, reasons: dict, elapsed: float) -> dict:
    """What the samples' materialization shows, from the written table."""
    head = samples.head(5).collect()
    return {
        "read_at": MetadataValue.timestamp(datetime.now(UTC).timestamp()),
        "rows_read": rows_read,
        "rejected": rows_read - kept,
        "rejects_by_reason": MetadataValue.md(mapping_table(reasons, "reason", "rows")),
        "length_chars": MetadataValue.md(mapping_table(length_stats(samples), "column")),
        "with_input": int(samples.select((pl.col("input") != "").sum()).collect(engine=STREAMING).item()),
        "preview": MetadataValue.md(preview_markdown(head, kept)),
        "preview_rows_whole": MetadataValue.md(full_rows_markdown(head)),
        "load_seconds": round(elapsed, 2),
    }

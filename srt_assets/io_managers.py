"""Parquet storage for polars tables, one file per asset partition.

dagster-polars 0.27 does not work with polars 2.x (``scan_parquet`` lost ``storage_options``), so this
small IO manager builds on Dagster's own ``UPathIOManager``: it gets partition paths, multi-partition
loading and any fsspec filesystem (local, S3, GCS) for free; we only write and read the files.
Local writes go to a fresh temporary file first and are renamed over the target (``core.files``), so a killed
run never leaves half a Parquet file, a symlink at the target is replaced rather than written through, and
the temporaries of killed writes are removed by the next write.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
from dagster import (
    ConfigurableIOManagerFactory,
    DagsterInvariantViolationError,
    InputContext,
    OutputContext,
    TableColumn,
    TableSchema,
    UPathIOManager,
)
from upath import UPath

from srt_assets.core.files import (
    StagedParquet,
    move_into_place,
    read_parquet_file,
    scan_parquet_file,
    write_parquet_atomic,
)

# An input (``AssetIn(metadata={OPTIONAL_INPUT: True})``) that loads as None while any of its
# partitions is not materialized, for a reader that makes do with what exists (the report).
OPTIONAL_INPUT = "srt/optional_input"
# Dagster's standard table metadata keys: a partition's rows go under their own key (Dagster keeps
# dagster/row_count for a whole table).
ROW_COUNT = "dagster/row_count"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
COLUMN_SCHEMA = "dagster/column_schema"


def column_schema(schema: Mapping[str, pl.DataType], descriptions: Mapping[str, str] | None = None) -> TableSchema:
    """A polars schema as Dagster's table schema (``dagster/column_schema``), for the catalog."""
    descriptions = descriptions or {}
    return TableSchema(
        columns=[TableColumn(name, str(dtype), description=descriptions.get(name)) for name, dtype in schema.items()]
    )


def declared_descriptions(context: OutputContext) -> dict[str, str]:
    """Column descriptions the asset's definition declares, kept when the stored schema replaces it."""
    declared = (context.definition_metadata or {}).get(COLUMN_SCHEMA)
    schema = getattr(declared, "schema", declared)
    return {c.name: c.description for c in getattr(schema, "columns", []) if c.description}


class _ParquetTableIOManager(UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: OutputContext, obj: Any, path: UPath) -> None:
        local = path.protocol in ("", "file", "local")
        if isinstance(obj, StagedParquet):  # written a block at a time by the asset: moved, never loaded
            if local:
                move_into_place(obj.path, Path(path.path))
            else:
                with obj.path.open("rb") as staged, path.open("wb") as handle:
                    shutil.copyfileobj(staged, handle)
                obj.path.unlink(missing_ok=True)
            rows, schema = obj.rows, obj.schema
        elif isinstance(obj, pl.DataFrame):
            if local:
                write_parquet_atomic(obj, Path(path.path))
            else:
                with path.open("wb") as handle:
                    obj.write_parquet(handle)
            rows, schema = obj.height, obj.schema
        else:
            raise TypeError(
                f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}; "
                "this IO manager stores polars DataFrames (or tables staged by ParquetBlockWriter)"
            )
        # UPathIOManager records the path; the catalog shows these standard keys for every table.
        count_key = PARTITION_ROW_COUNT if context.has_partition_key else ROW_COUNT
        context.add_output_metadata(
            {count_key: rows, COLUMN_SCHEMA: column_schema(schema, declared_descriptions(context))}
        )

    def load_from_path(self, context: InputContext, path: UPath) -> pl.DataFrame | pl.LazyFrame:
        remedy = (
            f"rematerialize asset '{context.asset_key.to_user_string()}' to rewrite it (or delete the file "
            "and materialize it again)"
        )
        lazy = _wants_lazy(context)
        if lazy and path.protocol in ("", "file", "local"):
            return scan_parquet_file(Path(path.path), remedy)
        with path.open("rb") as handle:
            table = read_parquet_file(handle, path, remedy)
        return table.lazy() if lazy else table

    def load_partitions(self, context: InputContext) -> pl.DataFrame | None:
        """One table however many partitions the input spans (a source reading all its shards gets
        their union); a partition not materialized yet is named in the error, with its path."""
        paths = {str(key): path for key, path in self._get_paths_for_partitions(context).items()}
        missing = sorted(key for key, path in paths.items() if not path.exists())
        if missing and (context.definition_metadata or {}).get(OPTIONAL_INPUT):
            context.log.info(f"{context.asset_key.to_user_string()}: not materialized for {', '.join(missing)}")
            return None
        if missing:
            raise FileNotFoundError(
                f"asset '{context.asset_key.to_user_string()}' has no materialization for partition(s) "
                f"{', '.join(missing)} (expected {', '.join(str(paths[key]) for key in missing)}); "
                "materialize them first"
            )
        frames = [self.load_from_path(context, paths[key]) for key in sorted(paths)]
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")


def _wants_lazy(context: InputContext) -> bool:
    """An input annotated ``pl.LazyFrame`` is scanned, not read: its reader collects what it needs,
    a block at a time, so a stage's memory does not follow the table's size."""
    try:
        return context.dagster_type.typing_type is pl.LazyFrame
    except DagsterInvariantViolationError:  # a context built without a type (a test's): a table
        return False


class PolarsParquetIOManager(ConfigurableIOManagerFactory):
    """Stores each asset partition as ``<base_dir>/<asset key>/<partition>.parquet``."""

    base_dir: str

    def create_io_manager(self, context) -> _ParquetTableIOManager:
        return _ParquetTableIOManager(base_path=UPath(self.base_dir))

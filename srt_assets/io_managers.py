"""Parquet storage for polars tables, one file per asset partition.

dagster-polars 0.27 does not work with polars 2.x (``scan_parquet`` lost ``storage_options``), so this
small IO manager builds on Dagster's own ``UPathIOManager``: it gets partition paths, multi-partition
loading and any fsspec filesystem (local, S3, GCS) for free; we only write and read the files.
Local writes go to a fresh temporary file first and are renamed over the target (``core.files``), so a killed
run never leaves half a Parquet file, a symlink at the target is replaced rather than written through, and
the temporaries of killed writes are removed by the next write.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
from dagster import (
    ConfigurableIOManagerFactory,
    InputContext,
    OutputContext,
    TableColumn,
    TableSchema,
    UPathIOManager,
)
from upath import UPath

from srt_assets.core.files import read_parquet_file, write_parquet_atomic

# An input (``AssetIn(metadata={OPTIONAL_INPUT: True})``) that loads as None while any of its
# partitions is not materialized, for a reader that makes do with what exists (the report).
OPTIONAL_INPUT = "srt/optional_input"


def column_schema(schema: Mapping[str, pl.DataType], descriptions: Mapping[str, str] | None = None) -> TableSchema:
    """A polars schema as Dagster's table schema (``dagster/column_schema``), for the catalog."""
    descriptions = descriptions or {}
    return TableSchema(
        columns=[TableColumn(name, str(dtype), description=descriptions.get(name)) for name, dtype in schema.items()]
    )


def declared_descriptions(context: OutputContext) -> dict[str, str]:
    """Column descriptions the asset's definition declares, kept when the stored schema replaces it."""
    declared = (context.definition_metadata or {}).get("dagster/column_schema")
    schema = getattr(declared, "schema", declared)
    return {c.name: c.description for c in getattr(schema, "columns", []) if c.description}


class _ParquetTableIOManager(UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: OutputContext, obj: Any, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}; "
                "this IO manager stores polars DataFrames"
            )
        if path.protocol in ("", "file", "local"):
            write_parquet_atomic(obj, Path(path.path))
        else:
            with path.open("wb") as handle:
                obj.write_parquet(handle)
        # UPathIOManager records the path; the catalog shows these standard keys for every table.
        context.add_output_metadata(
            {
                "dagster/row_count": obj.height,
                "dagster/column_schema": column_schema(obj.schema, declared_descriptions(context)),
            }
        )

    def load_from_path(self, context: InputContext, path: UPath) -> pl.DataFrame:
        remedy = (
            f"rematerialize asset '{context.asset_key.to_user_string()}' to rewrite it (or delete the file "
            "and materialize it again)"
        )
        with path.open("rb") as handle:
            return read_parquet_file(handle, path, remedy)

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


class PolarsParquetIOManager(ConfigurableIOManagerFactory):
    """Stores each asset partition as ``<base_dir>/<asset key>/<partition>.parquet``."""

    base_dir: str

    def create_io_manager(self, context) -> _ParquetTableIOManager:
        return _ParquetTableIOManager(base_path=UPath(self.base_dir))

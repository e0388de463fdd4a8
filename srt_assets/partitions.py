"""How a source catalog partitions the graph: one partition per source, and per source x shard for
the row-wise model stages when the catalog asks for shards. Loading this module reads no catalog;
the partitions of the catalog the code location serves are in ``srt_assets/defs/partitions.py``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import polars as pl
from dagster import (
    MultiPartitionsDefinition,
    PartitionsDefinition,
    StaticPartitionsDefinition,
)

from srt_assets.core.sharding import shard_names, take_shard
from srt_assets.core.sources import SourceCatalog

SOURCE_DIMENSION = "source"
SHARD_DIMENSION = "source_shard"  # sorts after "source": keys read "alpaca|3", files alpaca/3.parquet


@dataclass(frozen=True)
class Partitioning:
    """How the graph is partitioned. Every asset is per source; with ``shards > 1`` the row-wise
    model stages (teacher reflection, student scoring) are per source x shard instead, so a large
    source's GPU work spreads over several runs, GPUs or machines. Dagster maps between the two
    by the shared "source" dimension: a shard reads its whole source (and keeps its own rows), a
    per-source stage after them reads all of the source's shards (the IO manager concatenates)."""

    sources: StaticPartitionsDefinition
    shards: int = 1

    @cached_property
    def row_partitions(self) -> PartitionsDefinition:
        """The partitions of the row-wise model stages."""
        if self.shards == 1:  # the same keys, but its own object: repartition tells the two apart
            return StaticPartitionsDefinition(self.sources.get_partition_keys())
        return MultiPartitionsDefinition(
            {SOURCE_DIMENSION: self.sources, SHARD_DIMENSION: StaticPartitionsDefinition(shard_names(self.shards))}
        )

    def source_name(self, partition_key: str) -> str:
        """The source of a row-stage partition key ('alpaca' or 'alpaca|3')."""
        if self.shards == 1:
            return str(partition_key)
        key = self.row_partitions.get_partition_key_from_str(str(partition_key))
        return str(key.keys_by_dimension[SOURCE_DIMENSION])

    def shard_index(self, partition_key: str) -> int:
        """The shard number in a row-stage partition key such as 'alpaca|3'."""
        key = self.row_partitions.get_partition_key_from_str(str(partition_key))
        return int(key.keys_by_dimension[SHARD_DIMENSION])

    def shard_rows(self, partition_key: str, frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | pl.LazyFrame:
        """The rows of a whole-source table that the given row-stage partition owns."""
        if self.shards == 1:
            return frame
        return take_shard(frame, self.shard_index(partition_key), self.shards)

    def shard_metadata(self, partition_key: str) -> dict[str, str]:
        if self.shards == 1:
            return {}
        return {"shard": f"{self.shard_index(partition_key)} of {self.shards}"}


def catalog_partitioning(catalog: SourceCatalog) -> Partitioning:
    return Partitioning(StaticPartitionsDefinition(catalog.names), catalog.shards)

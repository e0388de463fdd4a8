"""The graph's partitions, built once from the source catalog: one partition per source, and per
source x shard for the row-wise model stages when the catalog asks for shards.

Stage modules declare their assets at module level against ``SOURCES`` and ``ROWS``, the partitions
of the catalog this code location loads (``$SRT_SOURCES_FILE``, else sources.yaml). Definitions over
another catalog (a test's, a second deployment's) take the same assets with that catalog's
partitions through ``repartition``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import polars as pl
from dagster import (
    AssetsDefinition,
    BetaWarning,
    MultiPartitionsDefinition,
    PartitionsDefinition,
    StaticPartitionsDefinition,
)
from dagster._core.definitions.source_asset import SourceAsset

from srt_assets import paths
from srt_assets.core.sharding import shard_names, take_shard
from srt_assets.core.sources import SourceCatalog, load_catalog

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
    def rows(self) -> PartitionsDefinition:
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
        key = self.rows.get_partition_key_from_str(str(partition_key))
        return str(key.keys_by_dimension[SOURCE_DIMENSION])

    def shard_index(self, partition_key: str) -> int:
        """The shard number in a row-stage partition key such as 'alpaca|3'."""
        key = self.rows.get_partition_key_from_str(str(partition_key))
        return int(key.keys_by_dimension[SHARD_DIMENSION])

    def shard_rows(self, partition_key: str, frame: pl.DataFrame) -> pl.DataFrame:
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


LOADED_CATALOG = load_catalog(paths.sources_file())  # what this code location serves
LOADED = catalog_partitioning(LOADED_CATALOG)
SOURCES = LOADED.sources  # every per-source asset
ROWS = LOADED.rows  # the row-wise model stages: per source, or per source x shard

AssetDefinition = AssetsDefinition | SourceAsset


def repartition(definitions: Iterable[AssetDefinition], layout: Partitioning) -> list[AssetDefinition]:
    """The module-level assets with ``layout``'s partitions in place of ``SOURCES`` and ``ROWS``,
    their checks included. Dagster has no public call that re-partitions an asset together with
    its checks (``map_asset_specs`` refuses the mismatch midway), so its internal constructors are
    used here and only here; a test pins the result to the asset graph snapshot."""
    definitions = list(definitions)
    if layout == LOADED:
        return definitions
    swap = {id(SOURCES): layout.sources, id(ROWS): layout.rows}

    def swapped(partitions: PartitionsDefinition | None) -> PartitionsDefinition | None:
        return swap.get(id(partitions), partitions) if partitions is not None else None

    result: list[AssetDefinition] = []
    for definition in definitions:
        if isinstance(definition, SourceAsset):
            result.append(_with_source_partitions(definition, swapped(definition.partitions_def)))
            continue
        attributes = definition.get_attributes_dict()
        specs = [spec.replace_attributes(partitions_def=swapped(spec.partitions_def)) for spec in definition.specs]
        checks = {
            name: spec._replace(partitions_def=swapped(spec.partitions_def))
            for name, spec in attributes["check_specs_by_output_name"].items()
        }
        result.append(
            AssetsDefinition.dagster_internal_init(
                **{**attributes, "specs": specs, "check_specs_by_output_name": checks}
            )
        )
    return result


def _with_source_partitions(asset: SourceAsset, partitions: PartitionsDefinition | None) -> SourceAsset:
    with warnings.catch_warnings():  # resource_defs is a beta parameter; we pass the asset's own
        warnings.simplefilter("ignore", BetaWarning)
        return _source_asset(asset, partitions)


def _source_asset(asset: SourceAsset, partitions: PartitionsDefinition | None) -> SourceAsset:
    return SourceAsset.dagster_internal_init(
        key=asset.key,
        metadata=asset.raw_metadata,
        io_manager_key=asset.io_manager_key,
        io_manager_def=asset.io_manager_def,
        description=asset.description,
        partitions_def=partitions,
        group_name=asset.group_name,
        resource_defs=asset.resource_defs,
        observe_fn=asset.observe_fn,
        auto_observe_interval_minutes=asset.auto_observe_interval_minutes,
        tags=asset.tags,
        legacy_freshness_policy=asset.legacy_freshness_policy,
        op_tags=asset.op_tags,
        automation_condition=asset.automation_condition,
        _required_resource_keys=asset._required_resource_keys,
    )

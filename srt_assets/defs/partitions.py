"""The partitions of the catalog this code location serves (``$SRT_SOURCES_FILE``, else
sources.yaml), built once: the stage modules declare their assets at module level against
``SOURCES`` and ``ROWS``. Definitions over another catalog (a test's) take the same assets with that
catalog's partitions through ``repartition``."""

import warnings
from collections.abc import Iterable

from dagster import AssetsDefinition, BetaWarning, PartitionsDefinition
from dagster._core.definitions.source_asset import SourceAsset

from srt_assets import paths
from srt_assets.core.sources import load_catalog
from srt_assets.partitions import Partitioning, catalog_partitioning

LOADED_CATALOG = load_catalog(paths.sources_file())  # what this code location serves
LOADED = catalog_partitioning(LOADED_CATALOG)
SOURCES = LOADED.sources  # every per-source asset
ROWS = LOADED.row_partitions  # the row-wise model stages: per source, or per source x shard

AssetDefinition = AssetsDefinition | SourceAsset


def repartition(definitions: Iterable[AssetDefinition], layout: Partitioning) -> list[AssetDefinition]:
    """The module-level assets with ``layout``'s partitions in place of ``SOURCES`` and ``ROWS``,
    their checks included. Dagster has no public call that re-partitions an asset together with
    its checks (``map_asset_specs`` refuses the mismatch midway), so its internal constructors are
    used here and only here. Standalone ``@asset_check`` definitions are not supported: checks
    are declared on their assets. Tests pin every asset's and check's partitions, and the constructors'
    parameters, to what this function passes."""
    definitions = list(definitions)
    if layout == LOADED:
        return definitions
    swap = {id(SOURCES): layout.sources, id(ROWS): layout.row_partitions}

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


def with_description(asset: SourceAsset, description: str) -> SourceAsset:
    """The source asset with another description (one that names another catalog, say)."""
    with warnings.catch_warnings():  # resource_defs is a beta parameter; we pass the asset's own
        warnings.simplefilter("ignore", BetaWarning)
        return _source_asset(asset, asset.partitions_def, description)


def _with_source_partitions(asset: SourceAsset, partitions: PartitionsDefinition | None) -> SourceAsset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        return _source_asset(asset, partitions, asset.description)


def _source_asset(asset: SourceAsset, partitions: PartitionsDefinition | None, description: str | None) -> SourceAsset:
    return SourceAsset.dagster_internal_init(
        key=asset.key,
        metadata=asset.raw_metadata,
        io_manager_key=asset.io_manager_key,
        io_manager_def=asset.io_manager_def,
        description=description,
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

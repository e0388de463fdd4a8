"""Configurable Dagster resources: the source catalog (and, in later stages, models and devices)."""

from __future__ import annotations

from functools import cached_property

from dagster import ConfigurableResource

from srt_assets.core.sources import SourceCatalog, SourceSpec, load_catalog


class SourceCatalogResource(ConfigurableResource):
    """The YAML file that declares every source dataset (one Dagster partition per source)."""

    sources_file: str

    @cached_property
    def catalog(self) -> SourceCatalog:
        return load_catalog(self.sources_file)

    def source(self, name: str) -> SourceSpec:
        return self.catalog.get(name)

"""Stage 1, raw data: the observed source files and each source's samples and rejects."""

from dagster import Definitions

from srt_assets.core.sources import SourceCatalog
from srt_assets.defs.partitions import LOADED_CATALOG, repartition, with_description
from srt_assets.defs.raw.assets import raw_samples, source_files, source_files_description
from srt_assets.partitions import Partitioning

ASSETS = [source_files, raw_samples]


def definitions(layout: Partitioning, catalog: SourceCatalog) -> Definitions:
    """The stage over ``catalog``, whose table the source files' description shows."""
    files, samples = repartition(ASSETS, layout)
    if catalog != LOADED_CATALOG:
        files = with_description(files, source_files_description(catalog))
    return Definitions(assets=[files, samples])

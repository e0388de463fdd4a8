"""Stage 1, raw data: the observed source files and each source's samples and rejects."""

from dagster import Definitions

from srt_assets.defs.raw.assets import raw_samples, source_files
from srt_assets.partitions import Partitioning, repartition

ASSETS = [source_files, raw_samples]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))

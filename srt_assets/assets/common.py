"""Small helpers shared by the asset modules: metadata rendering and check-result conversion."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    MetadataValue,
    MultiPartitionsDefinition,
    PartitionsDefinition,
    StaticPartitionsDefinition,
)

from srt_assets.core.quality import CheckOutcome
from srt_assets.core.sharding import shard_names, take_shard
from srt_assets.executors import GPU_POOL, GPU_STEP_TAGS
from srt_assets.plots import histogram_markdown, line_plot_markdown, markdown_table  # noqa: F401 (re-exported)

SOURCE_PARTITIONS_DOC = "Partitioned per source dataset (see sources.yaml)."
# Arguments of every model step: the Dagster pool "gpu" (capped in dagster.yaml) and the tags that
# give each step one GPU on the Kubernetes and Celery executors (srt_assets/executors.py).
GPU_STEP = {"pool": GPU_POOL, "op_tags": GPU_STEP_TAGS}
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
        if self.shards == 1:
            return self.sources
        return MultiPartitionsDefinition(
            {SOURCE_DIMENSION: self.sources, SHARD_DIMENSION: StaticPartitionsDefinition(shard_names(self.shards))}
        )

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


def to_check_results(asset: str, outcomes: Iterable[CheckOutcome]) -> Iterator[AssetCheckResult]:
    """Turn pure check outcomes into Dagster results; failures are ERROR so blocking checks block."""
    for outcome in outcomes:
        yield AssetCheckResult(
            asset_key=asset,
            check_name=outcome.name,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata={
                key: MetadataValue.json(value) if isinstance(value, dict | list) else value
                for key, value in outcome.metadata.items()
            },
        )


def quantiles(values: pl.Series) -> dict[str, float]:
    """A compact distribution summary for metadata (nulls ignored)."""
    values = values.drop_nulls()
    if values.is_empty():
        return {}
    return {q: round(float(values.quantile(p)), 4) for q, p in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95))} | {
        "mean": round(float(values.mean()), 4)
    }

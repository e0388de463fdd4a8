"""Small helpers shared by the asset modules: metadata rendering and check-result conversion."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue

from srt_assets.core.quality import CheckOutcome
from srt_assets.executors import GPU_POOL, GPU_STEP_TAGS
from srt_assets.plots import histogram_markdown, line_plot_markdown, markdown_table  # noqa: F401 (re-exported)

SOURCE_PARTITIONS_DOC = "Partitioned per source dataset (see sources.yaml)."
# Arguments of every model step: the Dagster pool "gpu" (capped in dagster.yaml) and the tags that
# give each step one GPU on the Kubernetes and Celery executors (srt_assets/executors.py).
GPU_STEP = {"pool": GPU_POOL, "op_tags": GPU_STEP_TAGS}


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

"""What the asset modules share: blocking check specs and results, the standard
Dagster metadata, JSON-safe values, and compute figures that survive a rerun served from cache."""

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    MetadataValue,
    PartitionsDefinition,
)

from srt_assets.core.progress import ThrottledProgress
from srt_assets.core.quality import CheckOutcome
from srt_assets.executors import GPU_POOL, GPU_STEP_TAGS
from srt_assets.io_managers import column_schema  # noqa: F401 (re-exported for asset definitions)
from srt_assets.plots import mapping_table

SOURCE_PARTITIONS_DOC = "Partitioned per source dataset (see sources.yaml)."
# Arguments of every model step: the Dagster pool "gpu" (capped in dagster.yaml) and the tags that
# give each step one GPU on the Kubernetes and Celery executors (srt_assets/executors.py).
GPU_STEP = {"pool": GPU_POOL, "op_tags": GPU_STEP_TAGS}


def asset_checks(
    asset: str, checks: Mapping[str, str], partitions_def: PartitionsDefinition | None, blocking: bool
) -> list[AssetCheckSpec]:
    """Check specs (name → description) that belong to the asset's partitions, so a result shows on
    its own partition only; a blocking one that fails stops that partition's downstream assets."""
    return [
        AssetCheckSpec(name, asset=asset, blocking=blocking, description=description, partitions_def=partitions_def)
        for name, description in checks.items()
    ]


def blocking_checks(
    asset: str, checks: Mapping[str, str], partitions_def: PartitionsDefinition | None
) -> list[AssetCheckSpec]:
    return asset_checks(asset, checks, partitions_def, blocking=True)


def to_check_results(
    asset: str, outcomes: Iterable[CheckOutcome], severity: AssetCheckSeverity = AssetCheckSeverity.ERROR
) -> Iterator[AssetCheckResult]:
    """Turn pure check outcomes into Dagster results; failures are ERROR so blocking checks block."""
    for outcome in outcomes:
        yield AssetCheckResult(
            asset_key=asset,
            check_name=outcome.name,
            passed=outcome.passed,
            severity=severity,
            description=outcome.description,
            metadata={
                key: json_value(value) if isinstance(value, dict | list) else value
                for key, value in outcome.metadata.items()
            },
        )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN or infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_value(value: Any) -> MetadataValue:
    """For what programs read (the report's results, exported summaries); a person gets ``table_value``."""
    return MetadataValue.json(json_safe(value))


def table_value(
    data: Mapping[str, Any], key: str = "setting", value: str = "value", empty: str = "_(none)_"
) -> MetadataValue:
    """Settings, counts and quantiles as the small table a person reads in the UI, not a JSON block
    (numbers to 4 significant digits there; the Parquet tables keep them exact)."""
    return MetadataValue.md(mapping_table(json_safe(data), key, value, empty))


def quantiles(values: pl.Series) -> dict[str, float]:
    """A compact distribution summary for metadata (nulls and non-finite values ignored)."""
    values = values.drop_nulls()
    if values.dtype.is_float():
        values = values.filter(values.is_finite())
    if values.is_empty():
        return {}
    return {q: round(float(values.quantile(p)), 4) for q, p in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95))} | {
        "mean": round(float(values.mean()), 4)
    }


PRODUCED_BY = "figures_from_run"


def production_figures(
    context: AssetExecutionContext, asset: str | AssetKey, computed: bool, figures: Mapping[str, Any]
) -> dict[str, Any]:
    """Compute figures (throughput, wall time, device) of the run that produced the data.

    When this run computed something, they are its own. When everything came from the cache, they
    are carried over from the latest materialization of this partition that did compute, marked
    ``served_from_cache``; a partition computed elsewhere (another instance sharing the cache) says
    so instead of showing zeros."""
    if computed:
        return {**figures, "served_from_cache": False, PRODUCED_BY: MetadataValue.dagster_run(context.run_id)}
    key = AssetKey.from_coercible(asset)
    partition = context.partition_key if context.has_partition_key else None
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=25
    ).records
    for record in records:
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        served = metadata.get("served_from_cache")
        if served is not None and served.value is False and PRODUCED_BY in metadata:
            carried = {name: metadata[name] for name in figures if name in metadata}
            return {**carried, "served_from_cache": True, PRODUCED_BY: metadata[PRODUCED_BY]}
    return {"served_from_cache": True, "figures": "computed in a run this instance has no record of"}


def calls_progress(context, label: str, unit: str = "calls") -> ThrottledProgress:
    """A session's progress callback: a log line every few seconds (done, rate, ETA) and at the end."""
    return ThrottledProgress(label, context.log.info, unit=unit)


def judge_metadata(judge, stats) -> dict[str, Any]:
    """What every judging asset shows: which judge, the calls it made or took from the cache, their
    tokens and estimated cost (run_costs adds them up), and the failures by kind (never a key:
    ``describe`` hides it)."""
    return {
        "judge": table_value(judge.describe()),
        "calls_made": stats.calls,
        "cache_hits": stats.cache_hits,
        "tokens_in": stats.prompt_tokens,
        "tokens_out": stats.completion_tokens,
        "estimated_cost": round(judge.estimated_cost(stats.prompt_tokens, stats.completion_tokens), 4),
        "failures_by_kind": table_value(stats.failures, "kind", "calls", "no failures"),
    }

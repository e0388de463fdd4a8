"""The training sets side by side (selected, random, full, and any other): size, variant mix, score
distributions, overlap, and the same samples' rows next to each other; and what the run's model calls
cost, stage by stage. An auditor compares these before believing a win rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from srt_assets.core.variants import VARIANTS

COMPARISON_SCHEMA: dict[str, pl.DataType] = {
    "training_set": pl.String(),
    "rows": pl.Int64(),
    "share_of_source": pl.Float64(),
    **{f"rows_{v}": pl.Int64() for v in VARIANTS},
    "ifd_p50": pl.Float64(),
    "ifd_mean": pl.Float64(),
    "rifd_p50": pl.Float64(),
    "rifd_mean": pl.Float64(),
    "overlap": pl.String(),
}
COMPARISON_COLUMNS = {
    "training_set": "the asset the set is",
    "rows": "rows in the set",
    "share_of_source": "rows / the source's usable rows",
    **{f"rows_{v}": f"rows of variant {v}" for v in VARIANTS},
    "ifd_p50": "median student IFD of the set's rows (of the variant each row is)",
    "ifd_mean": "mean student IFD of the set's rows",
    "rifd_p50": "median student reverse IFD of the set's rows",
    "rifd_mean": "mean student reverse IFD of the set's rows",
    "overlap": "samples the set shares with each other set, and the share of its own rows they are",
}
COST_SCHEMA: dict[str, pl.DataType] = {
    "stage": pl.String(),
    "partitions": pl.Int64(),
    "calls_made": pl.Int64(),
    "cache_hits": pl.Int64(),
    "tokens_in": pl.Int64(),
    "tokens_out": pl.Int64(),
    "estimated_cost": pl.Float64(),
}
COST_COLUMNS = {
    "stage": "the asset that called a model, or total",
    "partitions": "its materialized partitions of this source (shards count one each)",
    "calls_made": "model calls its latest materializations made (the student: texts scored)",
    "cache_hits": "calls answered from the model-call cache instead",
    "tokens_in": "prompt tokens of the calls made (null: the stage does not count them)",
    "tokens_out": "completion tokens of the calls made",
    "estimated_cost": "money at the backend's configured price (0 for local models; null: not reported)",
}


def long_scores(decisions: pl.DataFrame) -> pl.DataFrame:
    """(sample_id, variant, ifd, rifd) from a decisions table's ``ifd_<v>`` / ``rifd_<v>`` columns."""
    parts = [
        decisions.select("sample_id", pl.lit(v).alias("variant"), pl.col(f"ifd_{v}").alias("ifd"), f"rifd_{v}")
        .rename({f"rifd_{v}": "rifd"})
        .cast({"ifd": pl.Float64, "rifd": pl.Float64})
        for v in VARIANTS
    ]
    return pl.concat(parts)


def _overlap(name: str, sets: Mapping[str, pl.DataFrame]) -> str:
    own = set(sets[name]["sample_id"].to_list())
    parts = []
    for other, rows in sets.items():
        if other != name:
            shared = len(own & set(rows["sample_id"].to_list()))
            parts.append(f"{other}: {shared} ({shared / max(len(own), 1):.0%})")
    return "; ".join(parts)


def compare_training_sets(sets: Mapping[str, pl.DataFrame], decisions: pl.DataFrame, source_rows: int) -> pl.DataFrame:
    """One row per training set (COMPARISON_SCHEMA): its size, variant mix, the student's scores of
    its rows and its overlap with the others. ``sets`` maps a name to rows with sample_id and variant."""
    scores = long_scores(decisions)
    records = []
    for name, rows in sets.items():
        scored = rows.select("sample_id", "variant").join(scores, on=["sample_id", "variant"], how="left")
        mix = dict(rows.group_by("variant").len().iter_rows()) if rows.height else {}
        ifd, rifd = scored["ifd"].drop_nans().drop_nulls(), scored["rifd"].drop_nans().drop_nulls()
        records.append(
            {
                "training_set": name,
                "rows": rows.height,
                "share_of_source": rows.height / max(source_rows, 1),
                **{f"rows_{v}": int(mix.get(v, 0)) for v in VARIANTS},
                "ifd_p50": ifd.median() if ifd.len() else None,
                "ifd_mean": ifd.mean() if ifd.len() else None,
                "rifd_p50": rifd.median() if rifd.len() else None,
                "rifd_mean": rifd.mean() if rifd.len() else None,
                "overlap": _overlap(name, sets),
            }
        )
    return pl.DataFrame(records, schema=COMPARISON_SCHEMA)


def side_by_side(sets: Mapping[str, pl.DataFrame], raw_samples: pl.DataFrame, samples: int = 3) -> pl.DataFrame:
    """The same few samples in every set, one row each: the original texts, then per set the variant
    and answer it trains on ("not in the set" where it holds none). The samples are the first set's
    first ones (the selected set comes first), so a reader sees what the selection changed."""
    first = next((rows for rows in sets.values() if rows.height), raw_samples)
    ids = first["sample_id"].head(samples)
    table = raw_samples.filter(pl.col("sample_id").is_in(ids.implode())).select(
        "sample_id", pl.col("instruction").alias("original_instruction"), pl.col("output").alias("original_output")
    )
    for name, rows in sets.items():
        picked = rows.filter(pl.col("sample_id").is_in(ids.implode())).unique("sample_id", keep="first")
        part = picked.select(
            "sample_id",
            pl.col("variant").alias(f"{name}: variant"),
            pl.col("instruction").alias(f"{name}: instruction"),
            pl.col("output").alias(f"{name}: output"),
        )
        table = table.join(part, on="sample_id", how="left", maintain_order="left")
    return table.with_columns(pl.col(c).fill_null("not in the set") for c in table.columns if ": " in c)


def cost_table(records: Sequence[Mapping[str, object]]) -> pl.DataFrame:
    """Per stage and in total (COST_SCHEMA), from one record per materialized partition with the
    figures its metadata reported (absent figures stay null: a stage that counts no tokens is not 0)."""
    frame = pl.DataFrame(list(records), schema={k: v for k, v in COST_SCHEMA.items() if k != "partitions"})
    if frame.is_empty():
        return pl.DataFrame(schema=COST_SCHEMA)
    sums = [
        pl.when(pl.col(c).is_not_null().any()).then(pl.col(c).sum()).alias(c)
        for c in ("calls_made", "cache_hits", "tokens_in", "tokens_out", "estimated_cost")
    ]
    per_stage = frame.group_by("stage", maintain_order=True).agg(pl.len().cast(pl.Int64).alias("partitions"), *sums)
    total = per_stage.select(pl.lit("total").alias("stage"), pl.col("partitions").sum(), *sums)
    return pl.concat([per_stage, total]).select(*COST_SCHEMA).cast(COST_SCHEMA)

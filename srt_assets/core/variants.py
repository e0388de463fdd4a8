"""The four variants of a raw sample (docs/method.md, "Four variants") as rows of one table."""

from __future__ import annotations

from typing import TypeVar

import polars as pl

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)
VARIANTS = ("ori", "Q", "A", "QA")
VARIANT_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "variant": pl.String(),
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
}


def original_variants(raw_samples: FrameT) -> FrameT:
    """The ``ori`` rows: each raw sample as it came (x0, y0)."""
    return raw_samples.select("sample_id", pl.lit("ori").alias("variant"), "instruction", "input", "output").cast(
        VARIANT_SCHEMA
    )


def variant_rows(raw_samples: FrameT, new_instructions: FrameT, better_responses: FrameT) -> FrameT:
    """ori from the raw rows, Q from instruction reflection, A and QA from response reflection (in
    lazy mode only the reflected branch exists), table after table: for joins on (sample_id,
    variant), which need no order, so a scan's query never gathers the texts to sort them."""
    parts = [
        original_variants(raw_samples),
        new_instructions.select(*VARIANT_SCHEMA).cast(VARIANT_SCHEMA),
        better_responses.select(*VARIANT_SCHEMA).cast(VARIANT_SCHEMA),
    ]
    return pl.concat(parts)


def all_variants(raw_samples: FrameT, new_instructions: FrameT, better_responses: FrameT) -> FrameT:
    """``variant_rows`` sorted by sample then variant; lazy frames give a lazy frame (a reader that
    wants only the keys never reads the texts)."""
    order = {name: rank for rank, name in enumerate(VARIANTS)}
    return (
        variant_rows(raw_samples, new_instructions, better_responses)
        .with_columns(pl.col("variant").replace_strict(order, return_dtype=pl.Int8).alias("_rank"))
        .sort("sample_id", "_rank", maintain_order=True)
        .drop("_rank")
    )

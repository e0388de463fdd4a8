"""The four variants of a raw sample (METHOD.md, "Four variants") as rows of one table."""

from __future__ import annotations

import polars as pl

VARIANTS = ("ori", "Q", "A", "QA")
VARIANT_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "variant": pl.String(),
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
}


def original_variants(raw_samples: pl.DataFrame) -> pl.DataFrame:
    """The ``ori`` rows: each raw sample as it came (x0, y0)."""
    return raw_samples.select("sample_id", pl.lit("ori").alias("variant"), "instruction", "input", "output").cast(
        VARIANT_SCHEMA
    )

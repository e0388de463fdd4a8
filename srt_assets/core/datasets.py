"""Training datasets built from the selection, the baselines they are compared with, and exports.

Every training row keeps ``sample_id`` (the raw row it descends from) and ``variant`` (which of the
four texts it is), so a checkpoint's data can always be traced back to a source row and teacher call.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from srt_assets.core.files import atomic_write_text, write_parquet_atomic
from srt_assets.core.variants import VARIANT_SCHEMA

TRAINING_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "source": pl.String(),
    "row_index": pl.Int64(),
    "variant": pl.String(),
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
}


def original_training_rows(raw_samples: pl.DataFrame) -> pl.DataFrame:
    """The raw rows as training rows (variant ``ori``): the "full original data" baseline."""
    return raw_samples.select(
        "sample_id", "source", "row_index", pl.lit("ori").alias("variant"), "instruction", "input", "output"
    ).cast(TRAINING_SCHEMA)


def chosen_training_rows(raw_samples: pl.DataFrame, variants: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
    """The selected variant of each selected sample, in the training schema, ordered as the raw rows.

    ``variants`` holds every variant row (ori, Q, A, QA) in VARIANT_SCHEMA; ``decisions`` the
    selection records with ``selected`` and ``chosen_variant``.
    """
    chosen = decisions.filter(pl.col("selected")).select("sample_id", pl.col("chosen_variant").alias("variant"))
    texts = variants.select(*VARIANT_SCHEMA).join(chosen, on=["sample_id", "variant"], how="inner")
    return (
        raw_samples.select("sample_id", "source", "row_index")
        .join(texts, on="sample_id", how="inner", maintain_order="left")
        .select(*TRAINING_SCHEMA)
        .cast(TRAINING_SCHEMA)
    )


def random_baseline(original_rows: pl.DataFrame, size: int, seed: int) -> pl.DataFrame:
    """``size`` original rows drawn without replacement with a fixed seed, kept in source order so
    the same seed and data always give the same rows."""
    size = min(size, original_rows.height)
    indexed = original_rows.with_row_index("_position")
    drawn = indexed.sample(n=size, seed=seed, shuffle=False).sort("_position")
    return drawn.drop("_position")


def alpaca_records(rows: pl.DataFrame) -> list[dict]:
    """Alpaca-style records (instruction/input/output) plus the id that traces each back."""
    return rows.select("instruction", "input", "output", "sample_id", "variant").to_dicts()


def export_dataset(rows: pl.DataFrame, directory: Path, name: str) -> dict[str, Path]:
    """Write ``rows`` where other tools can train on them:

    - ``<name>.alpaca.json``: a JSON array of Alpaca records (FastChat, Cherry LLM, LLaMA-Factory);
    - ``hf/``: a folder ``datasets.load_dataset(path)`` reads (one Parquet shard plus a dataset card).
    """
    directory.mkdir(parents=True, exist_ok=True)
    alpaca = directory / f"{name}.alpaca.json"
    atomic_write_text(alpaca, json.dumps(alpaca_records(rows), ensure_ascii=False, indent=1))
    hf_dir = directory / "hf"
    shard = hf_dir / "data" / "train-00000-of-00001.parquet"
    write_parquet_atomic(rows, shard)
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n---\n"
        f"# {name}\n\n{rows.height} instruction-response rows exported by srt. Columns: "
        f"{', '.join(rows.columns)}. `sample_id` traces each row to its source row (`srt explain <sample_id>`).\n"
    )
    atomic_write_text(hf_dir / "README.md", card)
    return {"alpaca_json": alpaca, "hf_dataset": hf_dir}

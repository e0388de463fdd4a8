"""Training datasets built from the selection, the baselines they are compared with, and exports.

Every training row keeps ``sample_id`` (the raw row it descends from) and ``variant`` (which of the
four texts it is), so a checkpoint's data can always be traced back to a source row and teacher call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from srt_assets.core.files import ParquetBlockWriter, StagedParquet, atomic_path, atomic_write_text, blocks, row_count
from srt_assets.core.variants import VARIANT_SCHEMA, FrameT

TRAINING_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "source": pl.String(),
    "row_index": pl.Int64(),
    "variant": pl.String(),
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
}

TRAINING_COLUMNS = {
    "sample_id": "the raw row this row descends from (`srt explain <sample_id>`)",
    "source": "the source data set (sources.yaml), the partition",
    "row_index": "the row's position in the source file",
    "variant": "which text it is: ori (the original), Q (new instruction), A (better answer), QA (both)",
    "instruction": "the instruction as trained on",
    "input": "the optional input (context) of the instruction",
    "output": "the response as trained on",
}


def original_training_rows(raw_samples: FrameT) -> FrameT:
    """The raw rows as training rows (variant ``ori``): the "full original data" baseline."""
    return raw_samples.select(
        "sample_id", "source", "row_index", pl.lit("ori").alias("variant"), "instruction", "input", "output"
    ).cast(TRAINING_SCHEMA)


POSITION = "_position"  # a training row's raw position, carried by rows gathered out of raw order


def raw_keys(raw_samples: FrameT) -> FrameT:
    return raw_samples.select("sample_id", "source", "row_index").with_row_index(POSITION)


def chosen_rows_by_position(raw_samples: FrameT, variants: FrameT, decisions: FrameT) -> FrameT:
    """The selected variant of each selected sample in the training schema plus its raw POSITION,
    in the variants' order: the texts stream past the small table of chosen keys, never held
    (``in_raw_order`` or ``write_in_raw_order`` puts the rows in raw order)."""
    chosen = decisions.filter(pl.col("selected")).select("sample_id", pl.col("chosen_variant").alias("variant"))
    keys = raw_keys(raw_samples).join(chosen, on="sample_id", how="inner")
    texts = variants.select(*VARIANT_SCHEMA).join(keys, on=["sample_id", "variant"], how="inner", maintain_order="left")
    return texts.select(POSITION, *TRAINING_SCHEMA).cast(TRAINING_SCHEMA)


def in_raw_order(rows: FrameT) -> FrameT:
    """Rows that carry POSITION, sorted into raw order without it (for tables held in memory)."""
    return rows.sort(POSITION).drop(POSITION)


def chosen_training_rows(raw_samples: FrameT, variants: FrameT, decisions: FrameT) -> FrameT:
    """The selected variant of each selected sample, in the training schema, ordered as the raw rows.

    ``variants`` holds every variant row (ori, Q, A, QA) in VARIANT_SCHEMA; ``decisions`` the
    selection records with ``selected`` and ``chosen_variant``.
    """
    return in_raw_order(chosen_rows_by_position(raw_samples, variants, decisions))


def write_in_raw_order(
    rows: pl.LazyFrame, writers: Callable[[dict], ParquetBlockWriter], schema: dict, block_rows: int
) -> StagedParquet:
    """Rows gathered out of raw order (each with POSITION) written in raw order, a block at a time:
    first as they come to a staged file, then one range of ``block_rows`` raw positions after the
    other (each range reads only the row groups whose statistics overlap it)."""
    with writers({POSITION: pl.UInt32(), **schema}) as first:
        unordered = first.write_query(rows, block_rows)
    try:
        last = unordered.scan().select(pl.col(POSITION).max()).collect().item()
        with writers(schema) as final:
            for start in range(0, -1 if last is None else last + 1, block_rows):
                in_range = pl.col(POSITION).is_between(start, start + block_rows, closed="left")
                final.write(in_raw_order(unordered.scan().filter(in_range)).collect())
            return final.finish()
    finally:
        unordered.discard()


# checkpoint name → the training dataset asset it is fine-tuned on (the selected set first)
TRAINING_SETS = {
    "selected": "selected_dataset",
    "random": "baseline_random",
    "full": "baseline_full",
    "teacher": "baseline_teacher",
}
BASE = "base"  # the untrained student, where an evaluation scores it beside the checkpoints
TEACHER_PREFERENCE = ("QA", "A", "Q")  # the Reflection-Tuning baseline takes the most rewritten candidate


def teacher_rows_by_position(raw_samples: FrameT, variants: FrameT, unavailable: FrameT) -> FrameT:
    """Every sample's most rewritten candidate (QA, else A, else Q; the original where the teacher gave
    none) plus its raw POSITION, in the variants' order: all the teacher's reflections without the
    student's choice, the paper's "Reflection-Tuning" baseline. ``unavailable`` (``unavailable_table``:
    sample_id, variant, why) names the candidates that are none: a failed reflection or a copy of
    another text is not a rewrite. The choice is made on the keys; the texts stream past them."""
    preference = (*TEACHER_PREFERENCE, "ori")
    rank = pl.col("variant").replace_strict({v: position for position, v in enumerate(preference)}, default=None)
    best = (
        variants.select("sample_id", "variant")
        .join(unavailable.select("sample_id", "variant"), on=["sample_id", "variant"], how="anti")
        .filter(pl.col("variant").is_in(list(preference)))
        .group_by("sample_id")
        .agg(pl.col("variant").sort_by(rank).first())
    )
    keys = raw_keys(raw_samples).join(best, on="sample_id", how="inner")
    texts = variants.select(*VARIANT_SCHEMA).join(keys, on=["sample_id", "variant"], how="inner", maintain_order="left")
    return texts.select(POSITION, *TRAINING_SCHEMA).cast(TRAINING_SCHEMA)


def teacher_training_rows(raw_samples: FrameT, variants: FrameT, unavailable: FrameT) -> FrameT:
    """``teacher_rows_by_position`` ordered as the raw rows."""
    return in_raw_order(teacher_rows_by_position(raw_samples, variants, unavailable))


def random_baseline(original_rows: FrameT, size: int, seed: int) -> FrameT:
    """``size`` original rows drawn without replacement with a fixed seed, kept in source order so
    the same seed and data always give the same rows (the draw is of positions: 8 bytes a row)."""
    total = row_count(original_rows)
    every = pl.DataFrame({"_position": pl.int_range(total, eager=True, dtype=pl.UInt32)})
    drawn = every.sample(n=min(size, total), seed=seed, shuffle=False)["_position"]
    indexed = original_rows.with_row_index("_position")
    return indexed.filter(pl.col("_position").is_in(drawn.implode())).drop("_position")


EXPORT_BLOCK_ROWS = 16_384  # rows of a training set exported (and their records held) at once


def write_alpaca_json(rows: pl.LazyFrame, path: Path) -> None:
    """Alpaca-style records (instruction/input/output plus the id and variant that trace each back)
    as one JSON array, written a block of records at a time, atomically."""
    columns = ("instruction", "input", "output", "sample_id", "variant")
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.write("[")
        separator = "\n"
        for block in blocks(rows.select(columns), EXPORT_BLOCK_ROWS):
            for record in block.iter_rows(named=True):
                handle.write(separator + json.dumps(record, ensure_ascii=False))
                separator = ",\n"
        handle.write("\n]\n")


@dataclass(frozen=True)
class CardFacts:
    """What a dataset card says beyond the rows: where they came from, under which licence, and how
    they were made, so a set copied away from the run still tells its origin."""

    source: str
    method: str  # how the set was made, one paragraph
    source_description: str = ""
    license: str = ""  # the source catalog's licence text, inherited by every set made from it
    hub_id: str = ""  # the source's Hugging Face id, if it has one
    source_rows: int | None = None
    settings: Mapping[str, object] = field(default_factory=dict)  # teacher, student, rule: name → value
    columns: Mapping[str, str] = field(default_factory=lambda: dict(TRAINING_COLUMNS))  # column → description
    run_id: str | None = None
    version: str = ""


_CC = re.compile(r"\bCC[ -]?BY((?:[ -](?:NC|SA|ND))*)[ -]v?(\d\.\d)\b", re.IGNORECASE)
_NAMED_LICENSES = {
    r"\bCC0\b": "cc0-1.0",
    r"\bapache(?: license)?[ -]?(?:v|version )?2\.0\b": "apache-2.0",
    r"\bMIT\b": "mit",
}


def hub_license(text: str) -> tuple[str, str | None]:
    """The Hub's licence id for a catalog licence text ("CC BY-NC 4.0", also inside "derived from
    Alpaca (CC BY-NC 4.0)") → ("cc-by-nc-4.0", None); other text → ("other", the text); none → unknown."""
    match = _CC.search(text)
    if match:
        parts = [p.lower() for p in re.split(r"[ -]", match.group(1)) if p]
        return "-".join(["cc-by", *parts, match.group(2)]), None
    for pattern, hub_id in _NAMED_LICENSES.items():
        if re.search(pattern, text, re.IGNORECASE):
            return hub_id, None
    return ("other", text.strip()) if text.strip() else ("unknown", None)


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    bounds += [(10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if rows < bound), "n>1T" if rows >= 10**12 else "1B<n<10B")


def card_front_matter(row_count: int, name: str, facts: CardFacts) -> dict:
    """The card's YAML header in the Hub's conventions (licence, sources, size, task, data files)."""
    license_id, license_name = hub_license(facts.license)
    header: dict = {"license": license_id}
    if license_name:
        header["license_name"] = license_name
    header |= {
        "pretty_name": f"{name} ({facts.source}, srt)",
        "source_datasets": [f"extended|{facts.hub_id or facts.source}"],
        "size_categories": [size_category(row_count)],
        "task_categories": ["text-generation"],
        "tags": ["instruction-tuning", "reflection-tuning", "srt"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    return header


def _cell(value: object) -> str:
    """A setting as a table cell: inline code, pipes escaped (settings are ours, not data); a
    setting left unset (a rule without a top-k) says so instead of ``null``."""
    if value is None:
        return "not set"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def setting_rows(settings: Mapping[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """Nested settings as one row each (``student.model``), not a line of JSON a colleague must parse."""
    rows: list[tuple[str, object]] = []
    for name, value in settings.items():
        if isinstance(value, Mapping) and value:
            rows += setting_rows(value, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", value))
    return rows


def dataset_card(rows: pl.DataFrame | pl.LazyFrame, name: str, facts: CardFacts) -> str:
    """The README.md of an exported set: the Hub's front matter, then how the set was made."""
    rows = rows.lazy()
    mix = dict(rows.group_by("variant").len().sort("variant").collect().iter_rows())
    count = sum(mix.values())
    of_source = f" of the {facts.source_rows} rows of the source" if facts.source_rows is not None else ""
    lines = [
        "---",
        yaml.safe_dump(card_front_matter(count, name, facts), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {name} ({facts.source})",
        "",
        f"{count} instruction-response rows{of_source}, exported by srt {facts.version}".rstrip()
        + (f" in Dagster run `{facts.run_id}`." if facts.run_id else "."),
        "",
        "## Source",
        "",
        f"`{facts.source}`: {facts.source_description or 'no description in the source catalog'}. "
        f"Licence: {facts.license or 'not declared in the source catalog'} (inherited by this set).",
        "",
        "## How it was made",
        "",
        facts.method,
        "",
        "| variant | rows |",
        "|---|---:|",
        *(f"| {variant} | {count} |" for variant, count in mix.items()),
    ]
    if facts.settings:
        rows_of_settings = (f"| {k} | {_cell(v)} |" for k, v in setting_rows(facts.settings))
        lines += ["", "| setting | value |", "|---|---|", *rows_of_settings]
    described = [(c, facts.columns.get(c, "")) for c in rows.collect_schema().names()]
    lines += ["", "## Columns", "", "| column | meaning |", "|---|---|", *(f"| {c} | {d} |" for c, d in described)]
    return "\n".join(lines) + "\n"


def export_dataset(
    rows: pl.DataFrame | pl.LazyFrame, directory: Path, name: str, facts: CardFacts | None = None
) -> dict[str, Path]:
    """Write ``rows`` (a table, or a scan of one too large to hold) where other tools can train on them:

    - ``<name>.alpaca.json``: a JSON array of Alpaca records (FastChat, Cherry LLM, LLaMA-Factory);
    - ``hf/``: a folder ``datasets.load_dataset(path)`` reads (one Parquet shard plus a dataset card
      that names the licence, the source and how the set was made).
    """
    rows = rows.lazy()
    directory.mkdir(parents=True, exist_ok=True)
    alpaca = directory / f"{name}.alpaca.json"
    write_alpaca_json(rows, alpaca)
    hf_dir = directory / "hf"
    shard = hf_dir / "data" / "train-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(shard) as tmp:
        rows.sink_parquet(tmp)
    if facts is None:
        first = rows.select("source").head(1).collect()["source"]
        facts = CardFacts(source=str(first[0]) if len(first) else "unknown", method="")
    atomic_write_text(hf_dir / "README.md", dataset_card(rows, name, facts))
    return {"alpaca_json": alpaca, "hf_dataset": hf_dir}

"""Row-level provenance: from a training row back to its source row, teacher calls and scores."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import polars as pl

from srt_assets.core.files import read_parquet_file
from srt_assets.core.raw import SAMPLE_DIGEST
from srt_assets.core.sharding import shard_names

PROVENANCE_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "source_file": pl.String(),
    "branch": pl.String(),
    "ifd": pl.Float64(),
    "rifd": pl.Float64(),
    "ifd_threshold": pl.Float64(),
    "rifd_threshold": pl.Float64(),
    "instruction_call_key": pl.String(),
    "response_call_key": pl.String(),
    "decision_reason": pl.String(),
}
PROVENANCE_COLUMNS = {
    "source_file": "the source data file the row was read from",
    "branch": "the branch of the selection rule the sample took (QA, Q, A or ori)",
    "ifd": "the student's IFD of the chosen variant (exact)",
    "rifd": "the student's reverse IFD of the chosen variant (exact)",
    "ifd_threshold": "the IFD the candidate had to stay below",
    "rifd_threshold": "the reverse IFD the candidate had to stay below",
    "instruction_call_key": "the instruction-reflection call behind the row's instruction (model-call cache key)",
    "response_call_key": "the response-reflection call behind the row's answer (model-call cache key)",
    "decision_reason": "why the selection kept this variant, in words",
}


def _call_keys(candidates: pl.DataFrame, variant: str, name: str) -> pl.DataFrame:
    return candidates.filter(pl.col("variant") == variant).select("sample_id", pl.col("cache_key").alias(name))


def provenance_columns(
    decisions: pl.DataFrame,
    new_instructions: pl.DataFrame,
    better_responses: pl.DataFrame,
    source_file: str,
) -> pl.DataFrame:
    """Per selected sample: where it came from and which teacher calls and scores produced it.

    ``instruction_call_key`` is the instruction-reflection call (variants Q and QA descend from it),
    ``response_call_key`` the response-reflection call of the chosen variant (A or QA); either is
    null where the chosen text did not come from that call.
    """
    chosen = decisions.filter(pl.col("selected")).select(
        "sample_id",
        "chosen_variant",
        "branch",
        pl.col("chosen_ifd").alias("ifd"),
        pl.col("chosen_rifd").alias("rifd"),
        "ifd_threshold",
        "rifd_threshold",
        pl.col("reason").alias("decision_reason"),
    )
    q_keys = _call_keys(new_instructions, "Q", "_q_key")
    a_keys = _call_keys(better_responses, "A", "_a_key")
    qa_keys = _call_keys(better_responses, "QA", "_qa_key")
    joined = (
        chosen.join(q_keys, on="sample_id", how="left")
        .join(a_keys, on="sample_id", how="left")
        .join(qa_keys, on="sample_id", how="left")
    )
    variant = pl.col("chosen_variant")
    return joined.select(
        "sample_id",
        pl.lit(source_file).alias("source_file"),
        "branch",
        "ifd",
        "rifd",
        "ifd_threshold",
        "rifd_threshold",
        pl.when(variant.is_in(["Q", "QA"])).then(pl.col("_q_key")).alias("instruction_call_key"),
        pl.when(variant == "QA")
        .then(pl.col("_qa_key"))
        .when(variant == "A")
        .then(pl.col("_a_key"))
        .alias("response_call_key"),
        "decision_reason",
    ).cast(PROVENANCE_SCHEMA)


# The tables that mention samples, in pipeline order, and the row stages among them that a sharded
# catalog stores one file per shard (``<table>/<source>/<shard>.parquet``).
EXPLAINED_TABLES = (
    "raw_samples",
    "new_instructions",
    "better_responses",
    "student_scores",
    "sample_decisions",
    "selected_dataset",
    "baseline_random",
)
SHARDED_TABLES = ("new_instructions", "better_responses", "student_scores")


def load_partition_tables(storage: Path, source: str, shards: int = 1) -> dict[str, pl.DataFrame]:
    """The materialized tables of one source partition that mention samples (absent ones skipped);
    with a sharded catalog the row stages are read from all their shard files."""
    tables = {}
    for name in EXPLAINED_TABLES:
        files = [storage / name / f"{source}.parquet"]
        if name in SHARDED_TABLES and shards > 1:
            files = [storage / name / source / f"{shard}.parquet" for shard in shard_names(shards)]
        remedy = f"rematerialize asset '{name}' for partition '{source}' to rewrite it"
        present = [read_parquet_file(file, file, remedy) for file in files if file.is_file()]
        if present:
            tables[name] = pl.concat(present, how="vertical_relaxed")
    return tables


class SampleNotFound(ValueError):
    """An id that names no stored sample; the message says why without touching other paths."""


def source_of(sample_id: str, sources: Collection[str]) -> str:
    """The source (partition) a sample id belongs to: ids are ``<source>-<16 hex digits>``. Only a
    catalog source is accepted, so an id never becomes a path of its own choosing."""
    source, sep, digest = sample_id.rpartition("-")
    if not sep or not source or not SAMPLE_DIGEST.fullmatch(digest):
        raise SampleNotFound(f"not a sample id: {sample_id!r} (expected '<source>-<16 hex digits>')")
    if source not in sources:
        raise SampleNotFound(f"sample id {sample_id!r}: its source {source!r} is not in the catalog {sorted(sources)}")
    return source


def some_sample_ids(storage: Path, sources: Collection[str], limit: int = 3) -> list[str]:
    """A few ids of materialized raw samples per source: what an error shows for a wrong or empty id."""
    found: list[str] = []
    for source in sources:
        file = storage / "raw_samples" / f"{source}.parquet"
        if file.is_file():
            found += pl.scan_parquet(file).select("sample_id").head(limit).collect()["sample_id"].to_list()
    return found


def sample_story(sample_id: str, storage: Path, sources: Collection[str], shards: int = 1) -> dict:
    """``explain_sample`` of a stored sample, read from its source partition's tables."""
    sample_id = sample_id.strip()
    source = source_of(sample_id, sources)
    tables = load_partition_tables(storage, source, shards)
    if "raw_samples" not in tables:
        raise SampleNotFound(f"no materialized raw_samples for source '{source}' under {storage}")
    story = explain_sample(sample_id, tables)
    if not story.get("raw_samples"):
        raise SampleNotFound(f"sample {sample_id} is not in raw_samples of '{source}'")
    return story


def explain_sample(sample_id: str, tables: dict[str, pl.DataFrame]) -> dict:
    """Everything recorded about one sample, table by table (rows as dicts; missing tables skipped).

    ``tables`` maps asset names (``EXPLAINED_TABLES``) to that partition's table.
    """
    story: dict[str, object] = {"sample_id": sample_id, "source": sample_id.rpartition("-")[0]}
    for name, table in tables.items():
        if "sample_id" not in table.columns:
            continue
        rows = table.filter(pl.col("sample_id") == sample_id).to_dicts()
        story[name] = rows
    selected = story.get("selected_dataset")
    story["in_selected_dataset"] = bool(selected)
    if "baseline_random" in tables:
        story["in_baseline_random"] = bool(story.get("baseline_random"))
    return story


def for_people(value: object) -> str:
    """A number as a person reads it (4 significant digits); the tables and ``--json`` keep it exact."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def not_candidates_of(recorded: str | None) -> dict[str, str]:
    """A decision's ``unavailable`` column ("Q: parse_failed; QA: copy of A") as variant → why."""
    pairs = (part.split(": ", 1) for part in (recorded or "").split("; ") if ": " in part)
    return {variant: why for variant, why in pairs}


def format_story(story: dict) -> str:
    """A human-readable account of ``explain_sample``'s result, in pipeline order."""
    lines = [f"sample {story['sample_id']} (source '{story['source']}')"]

    def section(title: str) -> None:
        lines.append("")
        lines.append(f"== {title}")

    def text(label: str, value: object, limit: int = 400) -> None:
        value = "" if value is None else str(value)
        shown = value if len(value) <= limit else value[:limit] + f"… [{len(value)} chars]"
        lines.append(f"{label}: {shown}")

    raw = story.get("raw_samples") or []
    section("raw row")
    if not raw:
        lines.append("not found in raw_samples (materialize that partition, or check the id)")
    for row in raw:
        text("source row", row.get("row_index"))
        for field in ("instruction", "input", "output"):
            text(field, row.get(field))
    for name in ("new_instructions", "better_responses"):
        section(f"teacher: {name}")
        for row in story.get(name) or []:
            key = row.get("cache_key") or ""
            origin = "from" if "#row=" in key else "call"  # a reflection file's row, or a call
            lines.append(f"-- variant {row.get('variant')}: status {row.get('status')}, {origin} {key}")
            if row.get("error"):
                text("error", row["error"])
            text("instruction", row.get("instruction"))
            text("output", row.get("output"))
            text("raw teacher text", row.get("raw_text"), limit=800)
    decisions = story.get("sample_decisions") or []
    not_candidates = not_candidates_of(decisions[0].get("unavailable") if decisions else None)
    section("student scores")
    for row in story.get("student_scores") or []:
        note = not_candidates.get(str(row.get("variant")))
        mark = f"  ({note} — not a candidate)" if note else ""
        scores = f"IFD {for_people(row.get('ifd'))}  r-IFD {for_people(row.get('rifd'))}"
        lines.append(f"{row.get('variant')!s:>3}: {scores}{mark}")
    section("selection")
    for row in decisions:
        lines.append(f"branch {row.get('branch')}, chosen {row.get('chosen_variant')}, selected {row.get('selected')}")
        text("why", row.get("reason"))
        if row.get("unavailable"):
            text("not candidates", row["unavailable"])
    lines.append("")
    lines.append(f"in selected_dataset: {story['in_selected_dataset']}")
    if "in_baseline_random" in story:
        lines.append(f"in baseline_random: {story['in_baseline_random']}")
    return "\n".join(lines)

"""Reading a source file, a block of rows at a time, into normalized polars tables, with every bad row kept as a reject.

A malformed row never crashes a run and is never dropped silently: it lands in the rejects table with
the file, the row and the field at fault. Only a file that is missing or cannot be parsed at all fails.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from srt_assets.core.formats import FORMATS, RawDataError, RowProblem
from srt_assets.core.sources import SourceSpec, match_key

RAW_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "source": pl.String(),
    "row_index": pl.Int64(),
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
}
REJECT_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "file": pl.String(),
    "row_index": pl.Int64(),
    "field": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
    "raw_preview": pl.String(),
}
RAW_COLUMNS = {
    "sample_id": "<source>-<16 hex digits of the content hash>: stable, kept by every later stage",
    "source": "the source data set (sources.yaml), the partition",
    "row_index": "the record's position in the source file (0-based)",
    "instruction": "the instruction (x0) as read, after the source's field mapping",
    "input": "the optional input (context); empty where the record has none",
    "output": "the response (y0) as read",
}
REJECT_COLUMNS = {
    "source": "the source data set",
    "file": "the file the row was read from",
    "row_index": "the record's position in the file (0-based)",
    "field": "the field at fault",
    "reason": "why the row cannot be used (e.g. missing_field, empty_field, wrong_type, too_long)",
    "detail": "the specifics of the fault",
    "raw_preview": "the start of the record as it was in the file",
}
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


SAMPLE_DIGEST = re.compile(r"[0-9a-f]{16}")  # what sample_id puts after "<source>-"


def sample_id(source: str, instruction: str, input_text: str, output: str) -> str:
    """Stable id from source and content: the same pair always gets the same id, across reruns."""
    digest = hashlib.sha256("\x1f".join((source, instruction, input_text, output)).encode("utf-8"))
    return f"{source}-{digest.hexdigest()[:16]}"


def _text_field(record: dict[str, Any], key: str, *, required: bool, max_chars: int) -> str | RowProblem:
    value = record.get(key)
    if value is None:
        return RowProblem(key, "missing_field", f"field '{key}' is missing or null") if required else ""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return RowProblem(key, "invalid_utf8", f"field '{key}': {exc}")
    if not isinstance(value, str):
        return RowProblem(key, "wrong_type", f"field '{key}' is {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return RowProblem(key, "invalid_utf8", f"field '{key}' holds bytes that are not UTF-8 at {exc.start}")
    if len(value) > max_chars:
        detail = f"field '{key}' has {len(value):,} characters; the limit is {max_chars:,} (max_field_chars)"
        return RowProblem(key, "too_long", detail)
    if required and not value.strip():
        return RowProblem(key, "empty_field", f"field '{key}' is empty")
    return value


def _first_turns(record: dict[str, Any], key: str) -> tuple[Any, Any] | RowProblem:
    turns = record.get(key)
    if turns is None:
        return RowProblem(key, "missing_field", f"field '{key}' is missing or null")
    if not isinstance(turns, list):
        return RowProblem(key, "wrong_type", f"field '{key}' is {type(turns).__name__}, expected a list of turns")
    human_text = None
    for turn in turns:
        if not isinstance(turn, dict):
            return RowProblem(key, "wrong_type", f"a turn in '{key}' is {type(turn).__name__}, expected an object")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if human_text is None and role in HUMAN_ROLES:
            human_text = text
        elif human_text is not None and role in ASSISTANT_ROLES:
            return human_text, text
    which = "human" if human_text is None else "assistant"
    return RowProblem(key, "missing_field", f"no {which} turn in '{key}'")


def normalize_record(spec: SourceSpec, record: Any) -> tuple[str, str, str] | RowProblem:
    """Map one source record to (instruction, input, output), or say what is wrong with it."""
    if isinstance(record, RowProblem):
        return record
    if not isinstance(record, dict):
        return RowProblem("", "not_an_object", f"record is {type(record).__name__}, expected an object")
    fields = spec.fields
    if fields.conversations:
        turns = _first_turns(record, fields.conversations)
        if isinstance(turns, RowProblem):
            return turns
        view = {"instruction": turns[0], "output": turns[1]}
        keys = ("instruction", None, "output")
    else:
        view = record
        keys = (fields.instruction, fields.input, fields.output)
    limit = spec.max_field_chars
    instruction = _text_field(view, keys[0], required=True, max_chars=limit)
    input_text = _text_field(view, keys[1], required=False, max_chars=limit) if keys[1] else ""
    output = _text_field(view, keys[2], required=True, max_chars=limit)
    for value in (instruction, input_text, output):
        if isinstance(value, RowProblem):
            if fields.conversations:
                return RowProblem(fields.conversations, value.reason, f"{value.detail} (first turns)")
            return value
    return instruction, input_text, output  # type: ignore[return-value]


_PREVIEW = reprlib.Repr()
_PREVIEW.maxstring = _PREVIEW.maxother = 120
_PREVIEW.maxlist = _PREVIEW.maxdict = 6


def _preview(record: Any, limit: int = 200) -> str:
    """The start of a bad record, built without writing out its whole text (a row can be 200 MB)."""
    if isinstance(record, RowProblem):
        return ""
    text = _PREVIEW.repr(record)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _matched(result: tuple[str, str, str] | RowProblem, keys: set[tuple[str, str]]) -> bool:
    return not isinstance(result, RowProblem) and match_key(result[0], result[1]) in keys


RAW_BLOCK_ROWS = 16_384  # source rows normalized (and their records held) at once


class SeenIds:
    """The sample ids kept so far, each as the 8-byte digest its id ends in, sorted, beside the row
    it came from (16 bytes a row: the one table that grows with the source). The source's name
    is the same for every id of a load, so equal digests are equal ids."""

    def __init__(self) -> None:
        self.digests = np.empty(0, dtype=np.uint64)
        self.rows = np.empty(0, dtype=np.int64)

    @staticmethod
    def digest(sid: str) -> int:
        return int(sid[-16:], 16)

    def first_rows(self, digests: np.ndarray) -> np.ndarray:
        """The row each digest was first kept at, -1 where it is new."""
        if not self.digests.size:
            return np.full(digests.size, -1, dtype=np.int64)
        positions = np.minimum(np.searchsorted(self.digests, digests), self.digests.size - 1)
        return np.where(self.digests[positions] == digests, self.rows[positions], -1)

    def add(self, digests: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(digests, kind="stable")
        positions = np.searchsorted(self.digests, digests[order])
        self.digests = np.insert(self.digests, positions, digests[order])
        self.rows = np.insert(self.rows, positions, rows[order])


Normalized = tuple[int, Any, tuple[str, str, str] | RowProblem]  # row index, record, what it maps to


def _record_blocks(
    spec: SourceSpec, path: Path, only_keys: set[tuple[str, str]] | None, block_rows: int
) -> Iterator[list[Normalized]]:
    """The rows the load counts (``only_keys`` leaves the others out, ``limit`` stops it), normalized,
    ``block_rows`` at a time."""
    block: list[Normalized] = []
    count = 0
    for row_index, record in FORMATS[spec.format].rows(path):
        if spec.limit is not None and count >= spec.limit:
            break
        result = normalize_record(spec, record)
        if only_keys is not None and not _matched(result, only_keys):
            continue
        count += 1
        block.append((row_index, record, result))
        if len(block) >= block_rows:
            yield block
            block = []
    if block:
        yield block


def _block_tables(spec: SourceSpec, path: Path, block: list[Normalized], seen: SeenIds) -> tuple[pl.DataFrame, ...]:
    """One block's (samples, rejects); a sample whose id an earlier row has, in this block or in one
    before it (``seen``), is a duplicate of that row."""
    samples: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA}
    rejects: dict[str, list[Any]] = {name: [] for name in REJECT_SCHEMA}
    ids = [sample_id(spec.name, *result) if not isinstance(result, RowProblem) else "" for _, _, result in block]
    digests = np.fromiter((SeenIds.digest(sid) for sid in ids if sid), dtype=np.uint64)
    earlier = iter(seen.first_rows(digests).tolist())
    first_in_block: dict[str, int] = {}
    for (row_index, record, result), sid in zip(block, ids, strict=True):
        if isinstance(result, RowProblem):
            problem = result
        else:
            first = next(earlier)
            first = first if first >= 0 else first_in_block.get(sid)
            if first is None:
                first_in_block[sid] = row_index
                for key, value in zip(RAW_SCHEMA, (sid, spec.name, row_index, *result), strict=True):
                    samples[key].append(value)
                continue
            problem = RowProblem("", "duplicate", f"same instruction, input and output as row {first}")
        values = (spec.name, str(path), row_index, problem.field, problem.reason, problem.detail, _preview(record))
        for key, value in zip(REJECT_SCHEMA, values, strict=True):
            rejects[key].append(value)
    kept = np.fromiter((SeenIds.digest(sid) for sid in first_in_block), dtype=np.uint64)
    seen.add(kept, np.fromiter(first_in_block.values(), dtype=np.int64))
    return pl.DataFrame(samples, schema=RAW_SCHEMA), pl.DataFrame(rejects, schema=REJECT_SCHEMA)


def read_source(
    spec: SourceSpec, only_keys: set[tuple[str, str]] | None = None, block_rows: int = RAW_BLOCK_ROWS
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Read one source a block at a time: (samples, rejects) per ``block_rows`` rows read, memory
    one block (and the kept ids, ``SeenIds``). Raises only when the file as a whole is unusable, at
    the first block or, for a file that holds no records, after the last. ``only_keys``
    (``only_matched``): read just the rows with these match keys, as if the others were not in the
    file; ``limit`` then counts the rows read."""
    path = spec.require_file()
    seen = SeenIds()
    empty = True
    for block in _record_blocks(spec, path, only_keys, block_rows):
        empty = False
        yield _block_tables(spec, path, block, seen)
    if empty:
        raise RawDataError(f"{path}: the file holds no records")


def load_source(spec: SourceSpec, only_keys: set[tuple[str, str]] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``read_source`` whole: (samples, rejects) as two tables."""
    blocks = list(read_source(spec, only_keys))
    return pl.concat([samples for samples, _ in blocks]), pl.concat([rejects for _, rejects in blocks])


STREAMING = "streaming"  # polars' engine that reads a written table a morsel at a time


def length_stats(
    samples: pl.DataFrame | pl.LazyFrame, columns: tuple[str, ...] = ("instruction", "input", "output")
) -> dict:
    """Character-length summary per text column, for asset metadata; of a written table, polars'
    streaming engine reads the lengths a morsel at a time (never the whole texts)."""
    stats: dict[str, dict[str, float]] = {}
    for column in columns:
        lengths = pl.col(column).str.len_chars()
        figures = (
            samples.lazy()
            .select(
                lengths.len().alias("rows"),
                lengths.min().alias("min"),
                lengths.mean().alias("mean"),
                lengths.median().alias("p50"),
                lengths.quantile(0.95).alias("p95"),
                lengths.max().alias("max"),
            )
            .collect(engine=STREAMING)
            .row(0, named=True)
        )
        if not figures["rows"]:
            stats[column] = {}
            continue
        stats[column] = {
            "min": int(figures["min"]),
            "mean": round(float(figures["mean"]), 1),
            "p50": float(figures["p50"]),
            "p95": float(figures["p95"]),
            "max": int(figures["max"]),
        }
    return stats

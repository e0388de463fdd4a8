"""Reading a source file into one normalized polars table, with every bad row kept as a reject.

A malformed row never crashes a run and is never dropped silently: it lands in the rejects table with
the file, the row and the field at fault. Only a file that is missing or cannot be parsed at all fails.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from typing import Any

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


def load_source(spec: SourceSpec, only_keys: set[tuple[str, str]] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read one source into (samples, rejects). Raises only when the file as a whole is unusable.
    ``only_keys`` (``only_matched``): read just the rows with these match keys, as if the others were
    not in the file; ``limit`` then counts the rows read."""
    path = spec.require_file()
    samples: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA}
    rejects: dict[str, list[Any]] = {name: [] for name in REJECT_SCHEMA}
    first_row_of: dict[str, int] = {}

    def reject(row_index: int, problem: RowProblem, record: Any) -> None:
        for key, value in zip(
            REJECT_SCHEMA,
            (
                spec.name,
                str(path),
                row_index,
                problem.field,
                problem.reason,
                problem.detail,
                _preview(record),
            ),
            strict=True,
        ):
            rejects[key].append(value)

    count = 0
    for row_index, record in FORMATS[spec.format].rows(path):
        if spec.limit is not None and count >= spec.limit:
            break
        result = normalize_record(spec, record)
        if only_keys is not None and (
            isinstance(result, RowProblem) or match_key(result[0], result[1]) not in only_keys
        ):
            continue
        count += 1
        if isinstance(result, RowProblem):
            reject(row_index, result, record)
            continue
        instruction, input_text, output = result
        sid = sample_id(spec.name, instruction, input_text, output)
        if sid in first_row_of:
            detail = f"same instruction, input and output as row {first_row_of[sid]}"
            reject(row_index, RowProblem("", "duplicate", detail), record)
            continue
        first_row_of[sid] = row_index
        for key, value in zip(RAW_SCHEMA, (sid, spec.name, row_index, instruction, input_text, output), strict=True):
            samples[key].append(value)
    if not samples["sample_id"] and not rejects["row_index"]:
        raise RawDataError(f"{path}: the file holds no records")
    return pl.DataFrame(samples, schema=RAW_SCHEMA), pl.DataFrame(rejects, schema=REJECT_SCHEMA)


def length_stats(samples: pl.DataFrame, columns: tuple[str, ...] = ("instruction", "input", "output")) -> dict:
    """Character-length summary per text column, for asset metadata."""
    stats: dict[str, dict[str, float]] = {}
    for column in columns:
        lengths = samples.get_column(column).str.len_chars()
        if lengths.len() == 0:
            stats[column] = {}
            continue
        stats[column] = {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 1),
            "p50": float(lengths.median()),
            "p95": float(lengths.quantile(0.95)),
            "max": int(lengths.max()),
        }
    return stats

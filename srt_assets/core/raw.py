"""Reading a source file into one normalized polars table, with every bad row kept as a reject.

A malformed row never crashes a run and is never dropped silently: it lands in the rejects table with
the file, the row and the field at fault. Only a file that is missing or cannot be parsed at all fails.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import reprlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from srt_assets.core.sources import SourceSpec

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
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


class RawDataError(ValueError):
    """The whole file is unusable (unreadable, not JSON, not Parquet): names the file and position."""


@dataclass(frozen=True)
class RowProblem:
    field: str
    reason: str
    detail: str


SAMPLE_DIGEST = re.compile(r"[0-9a-f]{16}")  # what sample_id puts after "<source>-"


def sample_id(source: str, instruction: str, input_text: str, output: str) -> str:
    """Stable id from source and content: the same pair always gets the same id, across reruns."""
    digest = hashlib.sha256("\x1f".join((source, instruction, input_text, output)).encode("utf-8"))
    return f"{source}-{digest.hexdigest()[:16]}"


BOM = b"\xef\xbb\xbf"
# One JSON value of a row can be pathological without the file being wrong: json refuses integers of
# more than 4,300 digits (ValueError) and recurses once per nesting level (RecursionError).
UNPARSABLE_VALUE = (ValueError, RecursionError)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it ends in .gz, without a UTF-8 byte-order mark."""
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        what = "not a valid gzip file" if path.suffix.lower() == ".gz" else "cannot read the file"
        raise RawDataError(f"{path}: {what}: {exc}") from None
    if not data.strip(BOM + b" \t\r\n"):
        raise RawDataError(f"{path}: the file is empty (no records)")
    return data.removeprefix(BOM)


def _element_spans(text: str, start: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every top-level element of the JSON array opening at ``start``, found by a
    scan of strings and brackets (no recursion, so no element can be too deep to delimit)."""
    depth, begin = 0, None
    for match in _TOKENS.finditer(text, start + 1):
        token = match.group()
        if token in "[{":
            if depth == 0 and begin is None:
                begin = match.start()
            depth += 1
        elif token in "]}":
            if depth == 0:  # the array's own closing bracket
                if begin is not None:
                    yield begin, match.start()
                return
            depth -= 1
        elif token == ",":
            if depth == 0:
                yield begin if begin is not None else match.start(), match.start()
                begin = None
        elif depth == 0 and begin is None:  # a string or scalar element
            begin = match.start()


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]|[^\s"\[\]{},]+')


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is found and
    # rejected instead of the whole file failing to decode.
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RawDataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UNPARSABLE_VALUE:  # the file is JSON, but some row holds a value json will not build
        yield from _iter_json_elements(path, text)
        return
    if not isinstance(doc, list):
        raise RawDataError(f"{path}: expected a JSON array of records, found {type(doc).__name__}")
    yield from enumerate(doc)


def _iter_json_elements(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Row by row, for an array in which some rows cannot be parsed: those become rejects."""
    opening = len(text) - len(text.lstrip())
    if text[opening : opening + 1] != "[":
        raise RawDataError(f"{path}: expected a JSON array of records")
    for index, (begin, end) in enumerate(_element_spans(text, opening)):
        try:
            yield index, json.loads(text[begin:end])
        except UNPARSABLE_VALUE as exc:
            yield index, RowProblem("", "invalid_json", f"element {index}: {_unparsable(exc)}")


def _unparsable(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to parse"
    return str(exc).split("; use sys.set_int_max_str_digits")[0][:200]


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for index, line in enumerate(_read_bytes(path).split(b"\n")):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            yield index, json.loads(text)
        except json.JSONDecodeError as exc:
            yield index, RowProblem("", "invalid_json", f"line {index + 1}: {exc.msg} at column {exc.colno}")
        except UNPARSABLE_VALUE as exc:
            yield index, RowProblem("", "invalid_json", f"line {index + 1}: {_unparsable(exc)}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for corrupt files
        raise RawDataError(
            f"{path}: not a readable Parquet file (truncated or corrupt: {exc}); replace it with a complete copy "
            "(a download or copy cut short leaves a truncated file)"
        ) from exc
    yield from enumerate(frame.iter_rows(named=True))


READERS = {"json": _iter_json_array, "jsonl": _iter_jsonl, "parquet": _iter_parquet}


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


def load_source(spec: SourceSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read one source into (samples, rejects). Raises only when the file as a whole is unusable."""
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

    for count, (row_index, record) in enumerate(READERS[spec.format](path)):
        if spec.limit is not None and count >= spec.limit:
            break
        result = normalize_record(spec, record)
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

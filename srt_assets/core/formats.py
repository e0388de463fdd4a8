"""The source file formats, registered once: each one's name, the suffixes that imply it and the
reader that yields its rows, ``(row index, record or RowProblem)``. The catalog validates formats
against this registry and the raw stage reads through it, so adding a format is one entry here."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from srt_assets.core.files import blocks


class RawDataError(ValueError):
    """The whole file is unusable (unreadable, not JSON, not Parquet): names the file and position."""


@dataclass(frozen=True)
class RowProblem:
    field: str
    reason: str
    detail: str


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


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines, read as they are needed (gzip decompressed on the fly), without a UTF-8
    byte-order mark: a JSONL file of any size costs one line of memory."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    seen = False
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle):
                line = line.removeprefix(BOM) if number == 0 else line
                seen = seen or bool(line.strip())
                yield line
    except (OSError, EOFError, zlib.error) as exc:
        what = "not a valid gzip file" if path.suffix.lower() == ".gz" else "cannot read the file"
        raise RawDataError(f"{path}: {what}: {exc}") from None
    if not seen:
        raise RawDataError(f"{path}: the file is empty (no records)")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for index, line in enumerate(_lines(path)):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            yield index, json.loads(text)
        except json.JSONDecodeError as exc:
            yield index, RowProblem("", "invalid_json", f"line {index + 1}: {exc.msg} at column {exc.colno}")
        except UNPARSABLE_VALUE as exc:
            yield index, RowProblem("", "invalid_json", f"line {index + 1}: {_unparsable(exc)}")


PARQUET_BATCH_ROWS = 8192  # rows of a Parquet source decoded at once


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        pl.read_parquet_schema(path)  # a truncated file fails here, before any row is taken
        batches = blocks(pl.scan_parquet(path), PARQUET_BATCH_ROWS)
        index = 0
        for batch in batches:
            for row in batch.iter_rows(named=True):
                yield index, row
                index += 1
    except Exception as exc:  # polars raises several error types for corrupt files
        raise RawDataError(
            f"{path}: not a readable Parquet file (truncated or corrupt: {exc}); replace it with a complete copy "
            "(a download or copy cut short leaves a truncated file)"
        ) from exc


@dataclass(frozen=True)
class SourceFormat:
    name: str
    suffixes: tuple[str, ...]  # the file suffixes (before any .gz) that imply this format
    rows: Callable[[Path], Iterator[tuple[int, Any]]]


FORMATS: dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat("json", (".json",), _iter_json_array),
        SourceFormat("jsonl", (".jsonl", ".ndjson"), _iter_jsonl),
        SourceFormat("parquet", (".parquet", ".pq"), _iter_parquet),
    )
}


def format_of_suffix(suffix: str) -> str | None:
    """The format a file suffix implies (``.jsonl`` → jsonl), or None."""
    return next((f.name for f in FORMATS.values() if suffix.lower() in f.suffixes), None)

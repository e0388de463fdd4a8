"""Candidates and student statistics made elsewhere, read from files instead of computed.

The authors released every reflection they made (``umd-zhou-lab/Reflect_Alpaca_All``: splits origin,
reflect_instruction, reflect_response, reflect_both) and their Llama-2 students' statistics
(``MingLiiii/Alpaca_Analysis_llama2_7b``: one split per variant, a ``data`` record of ``loss`` and
``ppl`` lists). Both are row-aligned with the source: row i of every file is row i of the source
file. A source that declares such files in ``sources.yaml`` skips the teacher (or the student), and
the rest of the graph runs unchanged; every row names the file and row it came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from srt_assets.core.formats import FORMATS, RawDataError, RowProblem
from srt_assets.core.raw import normalize_record
from srt_assets.core.sources import SourceSpec, VariantFile, match_key
from srt_assets.core.teacher import ReflectionOutcome
from srt_assets.core.templates import merged_instruction

# The authors' order of the four statistics in each ``loss`` and ``ppl`` list.
STATISTIC_ORDER = ("Q_direct", "A_direct", "Q_condition", "A_condition")
FILE_ROWS_SCHEMA: dict[str, pl.DataType] = {
    "row_index": pl.Int64(),  # the source file's row index (raw_samples.row_index)
    "instruction": pl.String(),
    "input": pl.String(),
    "output": pl.String(),
    "status": pl.String(),  # ok | missing
    "error": pl.String(),
    "where": pl.String(),  # file#row=N
}


class FileLayoutError(ValueError):
    """The files do not fit together (row counts, alignment) or one cannot be read; names file and row."""


@dataclass(frozen=True)
class SourceRows:
    """The source file as the aligned files see it: the row index and original instruction per
    position (None where the source row itself is unusable)."""

    row_indexes: list[int]
    instructions: list[str | None]
    inputs: list[str | None]


def source_rows(spec: SourceSpec) -> SourceRows:
    """Every record of the source file, whatever ``limit`` says (the files cover the whole source)."""
    indexes, instructions, inputs = [], [], []
    for row_index, record in FORMATS[spec.format].rows(spec.require_file()):
        indexes.append(row_index)
        normal = normalize_record(spec, record)
        instructions.append(None if isinstance(normal, RowProblem) else normal[0])
        inputs.append(None if isinstance(normal, RowProblem) else normal[1])
    return SourceRows(indexes, instructions, inputs)


def _matched_index(file: VariantFile, source: SourceSpec) -> dict[tuple[str, str], tuple[int, Any]]:
    """A matched file's records by their match key, each with its row. A key given twice with other
    texts is an error naming both rows (which of them would be the teacher's answer?)."""
    if not file.path.is_file():
        raise FileLayoutError(f"source '{source.name}': reflections.{file.variant}: file not found: {file.path}")
    found: dict[tuple[str, str], tuple[int, Any]] = {}
    try:
        for position, (_, record) in enumerate(FORMATS[file.format].rows(file.path)):
            instruction = _text(record, file.fields["instruction"])
            if instruction is None:
                raise FileLayoutError(
                    f"source '{source.name}': {file.where(position)}: field '{file.fields['instruction']}' "
                    "is missing: a matched file pairs its rows by instruction"
                )
            given_input = _text(record, file.fields["input"]) if "input" in file.match_on else ""
            key = match_key(instruction, given_input)
            if key in found and found[key][1] != record:
                raise FileLayoutError(
                    f"source '{source.name}': {file.where(position)} and row {found[key][0]} have the same "
                    f"{' and '.join(file.match_on)} but other texts: keep one of them"
                )
            found.setdefault(key, (position, record))
    except RawDataError as exc:
        raise FileLayoutError(f"source '{source.name}': reflections.{file.variant}: {exc}") from None
    return found


def matched_keys(spec: SourceSpec) -> set[tuple[str, str]]:
    """The match keys the source's matched reflection files hold (``only_matched`` reads these rows)."""
    return {key for file in spec.matched_files for key in _matched_index(file, spec)}


def _matched_rows(file: VariantFile, spec: SourceSpec, source: SourceRows) -> list[dict[str, Any]]:
    """A matched file's rows in the source's order; a source row the file does not hold is missing,
    or left out where the source reads ``only_matched`` (its raw_samples never has that row)."""
    index = _matched_index(file, spec)
    rows = []
    for row_index, instruction, given_input in zip(source.row_indexes, source.instructions, source.inputs, strict=True):
        key = match_key(instruction, given_input if "input" in file.match_on else "") if instruction else None
        position, record = index.get(key, (None, None)) if key else (None, None)
        if position is None and spec.only_matched:
            continue
        if position is None:
            row = {"row_index": row_index, "instruction": None, "input": "", "output": None, "where": None}
            error = f"{file.path} holds no record with this row's {' and '.join(file.match_on)}"
            rows.append(row | {"status": "missing", "error": error})
        else:
            rows.append(_file_row(file, position, row_index, record))
    return rows


def _records(file: VariantFile, kind: str, source: SourceSpec, expected: int) -> list[Any]:
    if not file.path.is_file():
        raise FileLayoutError(f"source '{source.name}': {kind}.{file.variant}: file not found: {file.path}")
    try:
        records = [record for _, record in FORMATS[file.format].rows(file.path)]
    except RawDataError as exc:
        raise FileLayoutError(f"source '{source.name}': {kind}.{file.variant}: {exc}") from None
    if len(records) != expected:
        raise _misaligned(source, kind, file, len(records), expected)
    return records


def _misaligned(source: SourceSpec, kind: str, file: VariantFile, count: int, expected: int) -> FileLayoutError:
    return FileLayoutError(
        f"source '{source.name}': {kind}.{file.variant}: {file.path} has {count} rows, the source file "
        f"{source.path} has {expected}: the files must be row-aligned (row i of each is row i of the source)"
    )


def _text(record: Any, key: str) -> str | None:
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _normal(text: str) -> str:
    return " ".join(text.split())


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _file_row(file: VariantFile, position: int, row_index: int, record: Any) -> dict[str, Any]:
    row = {"row_index": row_index, "instruction": None, "input": "", "output": None, "where": file.where(position)}
    if isinstance(record, RowProblem):
        return row | {"status": "missing", "error": f"{file.where(position)}: {record.detail}"}
    if not isinstance(record, dict):
        return row | {"status": "missing", "error": f"{file.where(position)}: not a record"}
    keys = file.fields
    row |= {"instruction": _text(record, keys["instruction"]), "input": _text(record, keys["input"]) or ""}
    row["output"] = _text(record, keys["output"])
    required = ("instruction", "output") if file.variant == "Q" else ("output",)
    for role in required:
        if not (row[role] or "").strip():
            return row | {
                "status": "missing",
                "error": f"{file.where(position)}: field '{keys[role]}' is missing or empty",
            }
    return row | {"status": "ok", "error": None}


def _first_mismatch(
    rows: list[dict], against: Sequence[str | None], file: VariantFile, what: str, where: str
) -> str | None:
    """The first row whose instruction differs from the one the other file (or the source) holds."""
    for position, (row, other) in enumerate(zip(rows, against, strict=True)):
        mine = row["instruction"]
        if mine is not None and other is not None and _normal(mine) != _normal(other):
            return (
                f"{file.where(position)}: field '{file.fields['instruction']}' is {_preview(mine)}, but row {position} "
                f"of {where} has {what} {_preview(other)}: the files are not row-aligned"
            )
    return None


def load_reflections(spec: SourceSpec) -> dict[str, pl.DataFrame]:
    """Variant → its rows (FILE_ROWS_SCHEMA), validated: every file has the source's row count, the
    A file's instructions are the source's, the QA file's are the Q file's (where both carry one)."""
    source = source_rows(spec)
    rows: dict[str, list[dict]] = {}
    for variant, file in spec.reflections.items():
        if file.match_on:
            rows[variant] = _matched_rows(file, spec, source)
            continue
        records = _records(file, "reflections", spec, len(source.row_indexes))
        rows[variant] = [
            _file_row(file, i, index, record)
            for i, (index, record) in enumerate(zip(source.row_indexes, records, strict=True))
        ]
    problems = []
    if "A" in rows and not spec.reflections["A"].match_on:  # a matched file agrees with the source by its key
        where = f"the source file {spec.path}"
        problems.append(_first_mismatch(rows["A"], source.instructions, spec.reflections["A"], "instruction", where))
    if "QA" in rows:
        q_instructions = [row["instruction"] for row in rows["Q"]]
        where = f"the Q file {spec.reflections['Q'].path}"
        problems.append(_first_mismatch(rows["QA"], q_instructions, spec.reflections["QA"], "new instruction", where))
    if problem := next((p for p in problems if p), None):
        raise FileLayoutError(f"source '{spec.name}': {problem}")
    return {variant: pl.DataFrame(table, schema=FILE_ROWS_SCHEMA) for variant, table in rows.items()}


def file_outcomes(
    files: pl.DataFrame, rows: pl.DataFrame, kind: str, usable: Sequence[bool] | None = None
) -> list[ReflectionOutcome]:
    """What the teacher would have returned for ``rows`` (row_index, instruction, input, output): the
    file's texts where the file has them, the original texts (status ``missing``) where it does not
    or where ``usable`` says the row cannot take them (a QA answer to a Q that is missing)."""
    by_index = {row["row_index"]: row for row in files.iter_rows(named=True)}
    outcomes = []
    for position, row in enumerate(rows.iter_rows(named=True)):
        found = by_index.get(row["row_index"])
        ok = found is not None and found["status"] == "ok" and (usable is None or usable[position])
        if ok:
            instruction = merged_instruction(found["instruction"], found["input"]) if kind == "instruction" else None
            answer, error = found["output"], None
        else:
            instruction = row["instruction"] if kind == "instruction" else None
            answer = row["output"]
            error = (found or {}).get("error") or "no usable new instruction to answer (its Q row is missing)"
            if found is None:
                error = f"no row {row['row_index']} in the file"
        outcomes.append(
            ReflectionOutcome(
                instruction=instruction,
                answer=answer,
                status="ok" if ok else "missing",
                error=error,
                raw_text=None,
                cache_key=(found or {}).get("where") or "",
                attempts=0,
                prompt_tokens=0,
                completion_tokens=0,
                finish_reason=None,
                closed=True,
            )
        )
    return outcomes


def _numbers(value: Any) -> list[float | None] | None:
    if not isinstance(value, list | tuple) or len(value) != len(STATISTIC_ORDER):
        return None
    numbers: list[float | None] = []
    for item in value:
        known = isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item) and item > 0
        numbers.append(float(item) if known else None)
    return numbers


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def statistics_row(file: VariantFile, position: int, record: Any) -> dict[str, Any]:
    """One row's statistics as score columns (docs/method.md: IFD = ppl_A_condition / ppl_A_direct,
    r-IFD = ppl_Q_condition / ppl_Q_direct), or nulls with the reason naming the file and row."""
    data = record.get(file.fields["data"]) if isinstance(record, dict) else None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            data = None
    ppl = _numbers(data.get("ppl")) if isinstance(data, dict) else None
    loss = _numbers(data.get("loss")) if isinstance(data, dict) else None
    scores: dict[str, Any] = {}
    if ppl is not None:
        scores |= {f"ppl_{name}": value for name, value in zip(STATISTIC_ORDER, ppl, strict=True)}
        scores |= {"ifd": _ratio(ppl[3], ppl[1]), "rifd": _ratio(ppl[2], ppl[0])}
    if loss is not None:
        scores |= {f"loss_{name}": value for name, value in zip(STATISTIC_ORDER, loss, strict=True)}
        scores |= {"ifd_loss": _ratio(loss[3], loss[1]), "rifd_loss": _ratio(loss[2], loss[0])}
    if scores.get("ifd") is None or scores.get("rifd") is None:
        scores["null_reason"] = (
            f"{file.where(position)}: field '{file.fields['data']}' holds no usable ppl list of "
            f"{len(STATISTIC_ORDER)} positive numbers ({', '.join(STATISTIC_ORDER)})"
        )
    return scores


STATISTICS_BLOCK_ROWS = 8192  # source positions whose statistics are parsed at once


def _by_row_schema(schema: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """The statistics columns of ``schema`` keyed by the source's row index instead of the sample."""
    return {
        "row_index": pl.Int64(),
        **{name: t for name, t in schema.items() if name not in ("sample_id", "truncated")},
    }


def _statistics_blocks(spec: SourceSpec, schema: dict[str, pl.DataType]) -> Iterator[pl.DataFrame]:
    """Each statistics file's rows as score columns keyed by (row_index, variant), a block of
    positions at a time: the files are read side by side with the source, never held whole, and
    one that ends before or after the source is named with both counts."""
    assert spec.statistics is not None
    files = list(spec.statistics.files.values())
    for file in files:
        if not file.path.is_file():
            raise FileLayoutError(f"source '{spec.name}': statistics.{file.variant}: file not found: {file.path}")
    streams = [FORMATS[file.format].rows(file.path) for file in files]
    block_schema = _by_row_schema(schema)
    block: list[dict[str, Any]] = []
    try:
        for position, ((row_index, _), *records) in enumerate(
            zip(FORMATS[spec.format].rows(spec.require_file()), *streams, strict=True)
        ):
            for file, (_, record) in zip(files, records, strict=True):
                block.append({"row_index": row_index, "variant": file.variant} | statistics_row(file, position, record))
            if len(block) >= STATISTICS_BLOCK_ROWS:
                yield pl.DataFrame(block, schema=block_schema, strict=False)
                block = []
    except RawDataError as exc:
        raise FileLayoutError(f"source '{spec.name}': statistics: {exc}") from None
    except ValueError as exc:  # zip(strict=True): one file is longer or shorter than the source
        if "zip()" not in str(exc):
            raise
        raise _row_count_error(spec, files) from None
    yield pl.DataFrame(block, schema=block_schema, strict=False)


def _row_count_error(spec: SourceSpec, files: list[VariantFile]) -> FileLayoutError:
    """Which statistics file has another row count than the source (counted once more, to say so)."""
    expected = sum(1 for _ in FORMATS[spec.format].rows(spec.require_file()))
    for file in files:
        count = sum(1 for _ in FORMATS[file.format].rows(file.path))
        if count != expected:
            return _misaligned(spec, "statistics", file, count, expected)
    return FileLayoutError(f"source '{spec.name}': the statistics files and the source differ in row count")


def load_statistics(spec: SourceSpec, wanted: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Score rows for ``wanted`` (sample_id, variant, row_index), from the source's statistics files,
    in ``schema`` (the student-scores schema). A variant without a file gets null scores saying so.
    The files are parsed a block at a time into columns: no row stays a Python object."""
    assert spec.statistics is not None
    by_row = pl.concat(list(_statistics_blocks(spec, schema))).with_columns(pl.lit(True).alias("_found"))
    scores = wanted.select("sample_id", "variant", "row_index").join(
        by_row, on=["row_index", "variant"], how="left", maintain_order="left"
    )
    reason = (
        pl.when(~pl.col("variant").is_in(list(spec.statistics.files)))
        .then(pl.format("no statistics file for variant {}", pl.col("variant")))
        .when(pl.col("_found").is_null())
        .then(pl.format("row {} of the source is not in the statistics files", pl.col("row_index")))
        .otherwise(pl.col("null_reason"))
    )
    return scores.with_columns(pl.lit(False).alias("truncated"), reason.alias("null_reason")).select(list(schema))

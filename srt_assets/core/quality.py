"""Data-quality contracts for the pipeline's tables, validated with Great Expectations 1.x.

A contract names the expected schema, the columns that must not be null, the text columns that must
not be blank and the key columns that must be unique. ``validate_table`` runs one GX suite over the
table (converted to pandas at this boundary only, since GX validates pandas) and returns one outcome
per check, so each stage can expose them as separate Dagster asset checks; ``validate_written_table``
runs the same suite over a written file a block of rows at a time, so memory follows the block.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from srt_assets.core.files import blocks

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

_GX_LOCK = threading.Lock()
_GX_CONTEXT: Any = None


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TableContract:
    schema: dict[str, pl.DataType]
    not_null: tuple[str, ...] = ()
    not_blank: tuple[str, ...] = ()
    unique: tuple[str, ...] = ()

    def check_names(self) -> list[str]:
        return list(self.check_descriptions())

    def check_descriptions(self) -> dict[str, str]:
        """The checks this contract makes, each with what it asserts."""
        checks = {"schema_matches": _DESCRIPTIONS["schema_matches"]}
        if self.not_null:
            checks["no_nulls"] = _DESCRIPTIONS["no_nulls"]
        if self.not_blank:
            checks["text_not_blank"] = _DESCRIPTIONS["text_not_blank"]
        checks.update({f"{column}_unique": f"values of '{column}' are unique" for column in self.unique})
        return checks


def _context():
    """One ephemeral GX context per process: building suites is cheap, importing GX is not."""
    global _GX_CONTEXT
    import great_expectations as gx

    with _GX_LOCK:
        if _GX_CONTEXT is None:
            logging.getLogger("great_expectations").setLevel(logging.WARNING)
            _GX_CONTEXT = gx.get_context(mode="ephemeral")
            _GX_CONTEXT.variables.progress_bars = {"globally": False}
        return _GX_CONTEXT


def _summary(result: Any) -> dict[str, Any]:
    details = result.result or {}
    out: dict[str, Any] = {}
    if details.get("unexpected_count") is not None:
        out["unexpected_count"] = int(details["unexpected_count"])
    sample = details.get("partial_unexpected_list")
    if sample:
        out["unexpected_examples"] = [str(v)[:120] for v in sample[:5]]
    return out


def validate_table(frame: pl.DataFrame, contract: TableContract, suite_name: str) -> list[CheckOutcome]:
    """Validate ``frame`` against ``contract``; every check yields an outcome, passing or not."""
    import great_expectations as gx

    expected_columns = list(contract.schema)
    dtype_mismatches = {
        name: f"{frame.schema[name]} (expected {dtype})"
        for name, dtype in contract.schema.items()
        if name in frame.schema and frame.schema[name] != dtype
    }
    present = [c for c in expected_columns if c in frame.columns]

    expectations: dict[str, list[Any]] = {
        "schema_matches": [gx.expectations.ExpectTableColumnsToMatchOrderedList(column_list=expected_columns)],
        "no_nulls": [
            gx.expectations.ExpectColumnValuesToNotBeNull(column=c) for c in contract.not_null if c in present
        ],
        "text_not_blank": [
            gx.expectations.ExpectColumnValuesToMatchRegex(column=c, regex=r"\S")
            for c in contract.not_blank
            if c in present
        ],
    }
    for column in contract.unique:
        expectations[f"{column}_unique"] = (
            [gx.expectations.ExpectColumnValuesToBeUnique(column=column)] if column in present else []
        )

    context = _context()
    with _GX_LOCK:
        suite = gx.ExpectationSuite(name=suite_name)
        for group in expectations.values():
            for expectation in group:
                suite.add_expectation(expectation)
        # GX keeps suites by name in the context; each validation gets a fresh one.
        if suite_name in {s.name for s in context.suites.all()}:
            context.suites.delete(suite_name)
        suite = context.suites.add(suite)
        source_name = f"{suite_name}_source"
        if source_name in {s.name for s in context.data_sources.all().values()}:
            context.data_sources.delete(source_name)
        batch_def = (
            context.data_sources.add_pandas(source_name)
            .add_dataframe_asset("table")
            .add_batch_definition_whole_dataframe("whole")
        )
        result = batch_def.get_batch(batch_parameters={"dataframe": frame.to_pandas()}).validate(suite)

    by_type_and_column: dict[tuple[str, str | None], Any] = {
        (r.expectation_config.type, r.expectation_config.kwargs.get("column")): r for r in result.results
    }
    outcomes = []
    for name, group in expectations.items():
        failures: dict[str, Any] = {}
        for expectation in group:
            column = getattr(expectation, "column", None)
            res = by_type_and_column[(expectation.expectation_type, column)]
            if not res.success:
                failures[column or "table"] = _summary(res) or {"observed": str(res.result.get("observed_value"))}
        if name == "schema_matches" and dtype_mismatches:
            failures["dtypes"] = dtype_mismatches
        missing = [c for c in _columns_named_by(name, contract) if c not in frame.columns]
        if missing:
            failures["missing_columns"] = missing
        outcomes.append(
            CheckOutcome(
                name=name,
                passed=not failures,
                description=_DESCRIPTIONS.get(name, f"values of '{name.removesuffix('_unique')}' are unique"),
                metadata={"failures": failures} if failures else {"rows_checked": frame.height},
            )
        )
    return outcomes


GX_BLOCK_ROWS = 32_768  # rows of a written table the GX suite validates at once (pandas holds one block)


def validate_written_table(
    table: pl.LazyFrame, contract: TableContract, suite_name: str, block_rows: int = GX_BLOCK_ROWS
) -> list[CheckOutcome]:
    """``validate_table`` for a table too large to hold (a written file): the same GX suite runs on
    each block of rows, verdicts and counts add up, and each unique column is also checked across
    blocks (GX sees one block at a time) among 8-byte hashes, so memory follows the block."""
    failures: dict[str, dict[str, Any]] = {name: {} for name in contract.check_descriptions()}
    rows, block_count = 0, 0
    for block in blocks(table, block_rows):
        rows, block_count = rows + block.height, block_count + 1
        for outcome in validate_table(block, contract, suite_name):
            _add_failures(failures[outcome.name], outcome.metadata.get("failures", {}))
    if not block_count:  # an empty table still gets its schema and column checks
        for outcome in validate_table(table.head(0).collect(), contract, suite_name):
            _add_failures(failures[outcome.name], outcome.metadata.get("failures", {}))
    columns = table.collect_schema().names()
    for column in (c for c in contract.unique if c in columns and c not in failures[f"{c}_unique"]):
        if repeated := repeated_values(table, column):
            failures[f"{column}_unique"][column] = repeated
    descriptions = contract.check_descriptions()
    return [
        CheckOutcome(name, not found, descriptions[name], {"failures": found} if found else {"rows_checked": rows})
        for name, found in failures.items()
    ]


def _add_failures(total: dict[str, Any], block: dict[str, Any]) -> None:
    """One block's failures added to the table's: counts summed, the first five examples kept; a
    schema finding (the same in every block) kept once."""
    for key, found in block.items():
        if key not in total:
            total[key] = found
        elif isinstance(found, dict) and "unexpected_count" in found:
            total[key]["unexpected_count"] += found["unexpected_count"]
            examples = total[key].get("unexpected_examples", []) + found.get("unexpected_examples", [])
            total[key]["unexpected_examples"] = examples[:5]


def repeated_values(table: pl.LazyFrame, column: str) -> dict[str, Any]:
    """The rows whose ``column`` value another row has too, as GX reports them (count, first five):
    found among the values' 8-byte hashes (read by the streaming engine), then, where two hashes are
    equal, among those rows' values; {} when every value is unique."""
    hashes = table.select(pl.col(column).hash()).collect(engine="streaming").to_series()
    suspects = hashes.filter(hashes.is_duplicated()).unique()
    if suspects.is_empty():
        return {}
    candidates = table.filter(pl.col(column).hash().is_in(suspects.implode())).select(column).collect()
    repeated = candidates.filter(pl.col(column).is_duplicated()).get_column(column)
    if repeated.is_empty():
        return {}
    return {"unexpected_count": repeated.len(), "unexpected_examples": [str(v)[:120] for v in repeated.head(5)]}


def _columns_named_by(check: str, contract: TableContract) -> tuple[str, ...]:
    if check == "no_nulls":
        return contract.not_null
    if check == "text_not_blank":
        return contract.not_blank
    if check.endswith("_unique"):
        return (check.removesuffix("_unique"),)
    return ()


_DESCRIPTIONS = {
    "schema_matches": "columns and dtypes are exactly the expected schema",
    "no_nulls": "no nulls in required columns",
    "text_not_blank": "text columns hold non-whitespace text",
}


def ratio_check(name: str, numerator: int, denominator: int, bound: float, what: str) -> CheckOutcome:
    """A ratio that must stay at or under ``bound`` (e.g. rejected rows over rows read)."""
    ratio = numerator / denominator if denominator else 0.0
    return CheckOutcome(
        name=name,
        passed=ratio <= bound and denominator > 0,
        description=f"{what} ratio at most {bound:.2%}",
        metadata={
            "ratio": round(ratio, 6),
            "bound": bound,
            "numerator": numerator,
            "denominator": denominator,
        },
    )

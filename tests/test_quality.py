import polars as pl

from srt_assets.core.quality import ratio_check, validate_table
from srt_assets.core.raw import RAW_SCHEMA
from srt_assets.defs.raw.assets import RAW_CONTRACT


def good_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": ["s-1", "s-2"],
            "source": ["s", "s"],
            "row_index": [0, 1],
            "instruction": ["Do a thing.", "Do another."],
            "input": ["", "ctx"],
            "output": ["Done.", "Done too."],
        },
        schema=RAW_SCHEMA,
    )


def outcomes(frame: pl.DataFrame) -> dict[str, bool]:
    return {o.name: o.passed for o in validate_table(frame, RAW_CONTRACT, "test_suite")}


def test_good_table_passes_every_check():
    assert outcomes(good_frame()) == {
        "schema_matches": True,
        "no_nulls": True,
        "text_not_blank": True,
        "sample_id_unique": True,
    }


def test_each_defect_fails_its_own_check():
    frame = good_frame()
    assert not outcomes(frame.with_columns(pl.lit("s-1").alias("sample_id")))["sample_id_unique"]
    assert not outcomes(frame.with_columns(pl.Series("output", ["ok", "  \n"])))["text_not_blank"]
    nulls = outcomes(frame.with_columns(pl.Series("instruction", ["x", None], dtype=pl.String)))
    assert not nulls["no_nulls"]
    assert not outcomes(frame.drop("input"))["schema_matches"]
    assert not outcomes(frame.with_columns(pl.col("row_index").cast(pl.String)))["schema_matches"]


def test_failure_metadata_names_the_column_and_examples():
    result = {
        o.name: o
        for o in validate_table(good_frame().with_columns(pl.lit("dup").alias("sample_id")), RAW_CONTRACT, "test_suite")
    }
    failures = result["sample_id_unique"].metadata["failures"]
    assert failures["sample_id"]["unexpected_count"] == 2
    assert failures["sample_id"]["unexpected_examples"][0] == "dup"


def test_ratio_check_bounds():
    assert ratio_check("r", 5, 100, 0.05, "x").passed
    assert not ratio_check("r", 6, 100, 0.05, "x").passed
    assert not ratio_check("r", 0, 0, 0.05, "x").passed  # nothing read is a failure, not a pass

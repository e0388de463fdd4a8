import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from conftest import write_jsonl

from srt_assets.core.raw import RawDataError, load_source, sample_id
from srt_assets.core.sources import FieldMapping, SourceFileMissing, SourceSpec, infer_format

GOOD = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


def spec_for(path: Path, **kwargs) -> SourceSpec:
    return SourceSpec(name="t", path=path, format=kwargs.pop("format", infer_format(path)), **kwargs)


def assert_good(samples: pl.DataFrame) -> None:
    assert samples.columns == ["sample_id", "source", "row_index", "instruction", "input", "output"]
    assert samples.get_column("instruction").to_list() == [r["instruction"] for r in GOOD]
    assert samples.get_column("input").to_list() == ["", "cat"]
    assert samples.get_column("row_index").to_list() == [0, 1]


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".jsonl", ".jsonl.gz", ".parquet"])
def test_every_format_loads_the_same_rows(tmp_path: Path, suffix: str):
    path = tmp_path / f"data{suffix}"
    if suffix.startswith(".jsonl"):
        payload = "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    elif suffix.startswith(".json"):
        payload = json.dumps(GOOD).encode()
    if suffix == ".parquet":
        pl.DataFrame(GOOD).write_parquet(path)
    else:
        path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
    samples, rejects = load_source(spec_for(path))
    assert_good(samples)
    assert rejects.height == 0


def test_wizardlm_fields_without_input(tmp_path: Path):
    path = tmp_path / "wiz.json"
    path.write_text(
        json.dumps([{"idx": 7, "instruction": "Explain recursion.", "output": "A function calling itself."}])
    )
    samples, _ = load_source(
        spec_for(path, fields=FieldMapping(instruction="instruction", input=None, output="output"))
    )
    assert samples.row(0, named=True)["input"] == ""
    assert samples.row(0, named=True)["output"] == "A function calling itself."


def test_sharegpt_conversations_take_first_human_and_assistant_turn(tmp_path: Path):
    records = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "second question"},
                {"from": "gpt", "value": "second answer"},
            ],
        },
        {
            "id": "b",
            "conversations": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "no answer"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    samples, rejects = load_source(spec_for(path, fields=FieldMapping(conversations="conversations")))
    assert samples.select("instruction", "output").rows() == [("Hi?", "Hello!"), ("Q2", "A2")]
    assert rejects.row(0, named=True)["row_index"] == 2
    assert rejects.row(0, named=True)["reason"] == "missing_field"
    assert "assistant" in rejects.row(0, named=True)["detail"]


def test_bad_rows_go_to_rejects_with_file_row_field_and_reason(tmp_path: Path):
    lines = [
        json.dumps(GOOD[0]).encode(),
        json.dumps({"instruction": "x", "input": ""}).encode(),  # 1 missing output
        json.dumps({"instruction": "   ", "input": "", "output": "y"}).encode(),  # 2 blank instruction
        json.dumps({"instruction": 5, "input": "", "output": "y"}).encode(),  # 3 wrong type
        b'{"instruction": "caf\xe9", "input": "", "output": "ok"}',  # 4 latin-1 byte: invalid UTF-8
        b'{"instruction": "broken", ',  # 5 not JSON
        json.dumps(["a", "list"]).encode(),  # 6 not an object
        json.dumps(GOOD[0]).encode(),  # 7 duplicate of row 0
        b"",  # blank line: not a row
        json.dumps(GOOD[1]).encode(),  # 9 good
        json.dumps({"instruction": "q", "input": ["not", "text"], "output": "y"}).encode(),  # 10 wrong type input
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))
    samples, rejects = load_source(spec_for(path))
    assert samples.get_column("row_index").to_list() == [0, 9]
    got = {(r["row_index"], r["field"], r["reason"]) for r in rejects.iter_rows(named=True)}
    assert got == {
        (1, "output", "missing_field"),
        (2, "instruction", "empty_field"),
        (3, "instruction", "wrong_type"),
        (4, "instruction", "invalid_utf8"),
        (5, "", "invalid_json"),
        (6, "", "not_an_object"),
        (7, "", "duplicate"),
        (10, "input", "wrong_type"),
    }
    assert set(rejects.get_column("file")) == {str(path)}
    duplicate = rejects.filter(pl.col("reason") == "duplicate").row(0, named=True)
    assert "row 0" in duplicate["detail"]


def test_invalid_utf8_inside_a_json_array_rejects_only_that_row(tmp_path: Path):
    path = tmp_path / "arr.json"
    path.write_bytes(b'[{"instruction": "ok", "output": "fine"}, {"instruction": "bad \xff byte", "output": "x"}]')
    samples, rejects = load_source(spec_for(path))
    assert samples.height == 1
    assert rejects.select("row_index", "field", "reason").rows() == [(1, "instruction", "invalid_utf8")]


def test_limit_reads_only_first_rows(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    samples, _ = load_source(spec_for(path, limit=3))
    assert samples.get_column("instruction").to_list() == ["q0", "q1", "q2"]


def test_sample_id_is_stable_and_content_derived(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    first, _ = load_source(spec_for(path))
    reordered = write_jsonl(tmp_path / "e.jsonl", list(reversed(GOOD)))
    second, _ = load_source(spec_for(reordered))
    assert sorted(first.get_column("sample_id")) == sorted(second.get_column("sample_id"))
    assert first.row(0, named=True)["sample_id"] == sample_id("t", GOOD[0]["instruction"], "", GOOD[0]["output"])
    assert sample_id("t", "a", "", "b") != sample_id("other", "a", "", "b")
    assert sample_id("t", "a", "b", "") != sample_id("t", "a", "", "b")


def test_missing_file_fails_naming_it(tmp_path: Path):
    with pytest.raises(SourceFileMissing, match=str(tmp_path / "absent.json")):
        load_source(spec_for(tmp_path / "absent.json"))


@pytest.mark.parametrize(
    ("name", "payload", "pattern"),
    [
        (
            "broken.json",
            b'[{"instruction": "a", "output": "b"},\n {"instr',
            r"broken\.json: not valid JSON at line 2",
        ),
        ("object.json", b'{"instruction": "a"}', r"object\.json: expected a JSON array"),
        ("bad.parquet", b"PAR1 not really", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_unparsable_file_fails_naming_it(tmp_path: Path, name: str, payload: bytes, pattern: str):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(RawDataError, match=pattern):
        load_source(spec_for(path))


def test_an_over_long_field_is_a_reject_naming_file_row_field_and_the_limit(tmp_path: Path):
    """A 10-million-character instruction (a broken export, or an attack on the teacher's bill and the
    student's memory) goes to rejects, its preview short; the other rows load."""
    huge = "why " * 2_500_000
    rows = [
        {"instruction": "q0", "input": "", "output": "a0"},
        {"instruction": huge, "input": "", "output": "a1"},
        {"instruction": "q2", "input": "x" * 300, "output": "a2"},
    ]
    path = write_jsonl(tmp_path / "huge.jsonl", rows)
    samples, rejects = load_source(SourceSpec(name="s", path=path, format="jsonl"))
    assert samples["row_index"].to_list() == [0, 2]
    reject = rejects.row(0, named=True)
    assert (reject["file"], reject["row_index"], reject["field"], reject["reason"]) == (
        str(path),
        1,
        "instruction",
        "too_long",
    )
    assert "10,000,000 characters" in reject["detail"] and "100,000" in reject["detail"]
    assert len(reject["raw_preview"]) <= 200
    strict = SourceSpec(name="s", path=path, format="jsonl", max_field_chars=200)
    _, rejects = load_source(strict)
    assert rejects["row_index"].to_list() == [1, 2] and rejects["field"].to_list() == ["instruction", "input"]


def test_max_field_chars_is_read_from_the_catalog(tmp_path: Path):
    from srt_assets.core.sources import SourceConfigError, load_catalog

    (tmp_path / "d.jsonl").write_text("{}\n")
    catalog = tmp_path / "sources.yaml"
    catalog.write_text(
        "defaults:\n  max_field_chars: 5000\nsources:\n  a:\n    path: d.jsonl\n"
        "  b:\n    path: d.jsonl\n    max_field_chars: 70\n"
    )
    loaded = load_catalog(catalog)
    assert (loaded.get("a").max_field_chars, loaded.get("b").max_field_chars) == (5000, 70)
    catalog.write_text("sources:\n  a:\n    path: d.jsonl\n    max_field_chars: -1\n")
    with pytest.raises(SourceConfigError, match="max_field_chars"):
        load_catalog(catalog)


def test_a_source_read_in_blocks_is_the_source_read_at_once(tmp_path: Path):
    """Blocks of 3 rows give the rows and rejects of one block, in order; a duplicate of a row kept in
    an earlier block is still a duplicate of that row."""
    from srt_assets.core.raw import read_source

    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    records[4] = {"instruction": "q0", "input": "", "output": "a0"}  # row 0's pair, in the second block
    records[5] = {"instruction": "", "input": "", "output": "x"}
    records[8] = {"instruction": "q7", "input": "", "output": "a7"}  # row 7's, in the same block
    spec = spec_for(write_jsonl(tmp_path / "d.jsonl", records))
    blocks = list(read_source(spec, block_rows=3))
    assert len(blocks) == 4 and [s.height + r.height for s, r in blocks] == [3, 3, 3, 1]
    samples, rejects = load_source(spec)
    assert pl.concat([s for s, _ in blocks]).equals(samples) and pl.concat([r for _, r in blocks]).equals(rejects)
    assert samples["row_index"].to_list() == [0, 1, 2, 3, 6, 7, 9]
    assert rejects.select("row_index", "reason", "detail").rows() == [
        (4, "duplicate", "same instruction, input and output as row 0"),
        (5, "empty_field", "field 'instruction' is empty"),
        (8, "duplicate", "same instruction, input and output as row 7"),
    ]
    assert list(read_source(spec_for(spec.path, limit=5), block_rows=2))[-1][1]["row_index"].to_list() == [4]


def test_the_checks_of_a_written_table_are_validate_tables(tmp_path: Path):
    """``validate_written_table`` (the raw stage's checks on the written file, the GX suite a block
    of rows at a time) gives what the suite gives the whole table: names, verdicts, counts,
    examples, and a value repeated in two blocks (which GX, seeing one block, cannot see)."""
    from srt_assets.core.quality import validate_table, validate_written_table
    from srt_assets.core.raw import RAW_SCHEMA
    from srt_assets.defs.raw.assets import RAW_CONTRACT

    bad = pl.DataFrame(
        {"sample_id": ["a", "b", "c", "a"], "source": ["s", None, "s", "s"], "row_index": [0, 1, 2, 3],
         "instruction": ["x", " ", "y", "\t"], "input": ["", "", "", ""], "output": ["o", "o", None, "o"]},
        schema=RAW_SCHEMA,
    )  # fmt: skip
    for frame in (bad, bad.drop("input").with_columns(pl.col("row_index").cast(pl.Int32)), bad.head(1), bad.head(0)):
        frame.write_parquet(tmp_path / "t.parquet")
        expected = [[o.name, o.passed, o.description, o.metadata] for o in validate_table(frame, RAW_CONTRACT, "t")]
        got = validate_written_table(pl.scan_parquet(tmp_path / "t.parquet"), RAW_CONTRACT, "t", block_rows=2)
        assert [[o.name, o.passed, o.description, o.metadata] for o in got] == expected
    bad.write_parquet(tmp_path / "t.parquet")  # "a" in rows 0 and 3: blocks [0, 1] and [2, 3]
    unique = validate_written_table(pl.scan_parquet(tmp_path / "t.parquet"), RAW_CONTRACT, "t", block_rows=2)[-1]
    assert unique.name == "sample_id_unique" and unique.metadata["failures"]["sample_id"]["unexpected_count"] == 2

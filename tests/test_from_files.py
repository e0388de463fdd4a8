"""Reflections and statistics made elsewhere (core/from_files.py, core/agreement.py): the authors'
four-split layout and a one-file layout, their validation, and a run through the selection with no
teacher call. The real files cannot be downloaded here, so the tests build files in their layout."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import latest_metadata, materialize, table_cells, write_catalog
from openai_server import ScriptedOpenAIServer

from srt_assets.core.agreement import decision_agreement, rank_agreement
from srt_assets.core.from_files import FileLayoutError, load_reflections, statistics_row
from srt_assets.core.provenance import explain_sample, format_story, load_partition_tables
from srt_assets.core.sources import SourceConfigError, VariantFile, load_catalog
from srt_assets.definitions import build_definitions
from srt_assets.plots import for_people
from srt_assets.resources import OpenAIChatResource, StudentModelResource

TOPICS = ["photosynthesis", "the water cycle", "compound interest", "plate tectonics", "vaccines", "recursion"]


def originals(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "instruction": f"Explain {topic} (case {i}).",
                "input": "" if i % 3 else f"Audience {i}: a class of twelve-year-old students.",
                "output": f"It is about {topic}.",
            }
        )
    return rows


def authors_layout(directory: Path, n: int, fmt: str = "parquet") -> dict[str, Path]:
    """The four row-aligned splits of umd-zhou-lab/Reflect_Alpaca_All, in Alpaca fields."""
    directory.mkdir(parents=True, exist_ok=True)
    ori = originals(n)
    splits = {
        "origin": ori,
        "reflect_instruction": [
            {
                "instruction": f"Describe {TOPICS[i % len(TOPICS)]} step by step for a curious reader, case {i}.",
                "input": "",
                "output": f"First, {TOPICS[i % len(TOPICS)]} begins with a cause. Then it unfolds in stages.",
            }
            for i in range(n)
        ],
        "reflect_response": [
            {**row, "output": f"A fuller answer: {TOPICS[i % len(TOPICS)]} works through several linked steps."}
            for i, row in enumerate(ori)
        ],
    }
    splits["reflect_both"] = [
        {**row, "output": f"In detail: {TOPICS[i % len(TOPICS)]} proceeds in three stages, each with a cause."}
        for i, row in enumerate(splits["reflect_instruction"])
    ]
    paths = {}
    for name, records in splits.items():
        path = directory / f"{name}.{fmt}"
        if fmt == "parquet":
            pl.DataFrame(records).write_parquet(path)
        else:
            path.write_text(json.dumps(records), encoding="utf-8")
        paths[name] = path
    return paths


def reflections_entry(paths: dict[str, Path]) -> dict:
    return {
        "path": str(paths["origin"]),
        "reflections": {
            "Q": str(paths["reflect_instruction"]),
            "A": str(paths["reflect_response"]),
            "QA": str(paths["reflect_both"]),
        },
    }


def spec_of(tmp_path: Path, entry: dict, name: str = "s"):
    return load_catalog(write_catalog(tmp_path, {name: entry})).get(name)


def test_the_four_split_layout_is_read_row_by_row(tmp_path):
    paths = authors_layout(tmp_path / "reflect", 5)
    files = load_reflections(spec_of(tmp_path, reflections_entry(paths)))
    assert set(files) == {"Q", "A", "QA"}
    q = files["Q"].row(3, named=True)
    assert q["status"] == "ok" and q["instruction"].startswith("Describe plate tectonics")
    assert q["where"] == f"{paths['reflect_instruction']}#row=3"
    assert files["A"]["output"].to_list()[1].startswith("A fuller answer: the water cycle")


def test_a_misaligned_file_names_its_first_wrong_row(tmp_path):
    paths = authors_layout(tmp_path / "reflect", 6, fmt="json")
    records = json.loads(paths["reflect_response"].read_text())
    records[2], records[4] = records[4], records[2]  # two rows out of place
    paths["reflect_response"].write_text(json.dumps(records))
    with pytest.raises(FileLayoutError) as error:
        load_reflections(spec_of(tmp_path, reflections_entry(paths)))
    message = str(error.value)
    assert f"{paths['reflect_response']}#row=2" in message and "field 'instruction'" in message
    assert "(case 4)" in message and "(case 2)" in message and "not row-aligned" in message


def test_a_file_with_another_row_count_is_refused(tmp_path):
    paths = authors_layout(tmp_path / "reflect", 6)
    pl.read_parquet(paths["reflect_both"]).head(5).write_parquet(paths["reflect_both"])
    with pytest.raises(FileLayoutError, match=r"reflect_both.parquet has 5 rows, the source file .* has 6"):
        load_reflections(spec_of(tmp_path, reflections_entry(paths)))


def test_the_qa_file_must_answer_the_q_files_instructions(tmp_path):
    paths = authors_layout(tmp_path / "reflect", 4)
    both = pl.read_parquet(paths["reflect_both"])
    both.with_columns(pl.Series("instruction", [*both["instruction"][:3], "Something else entirely."])).write_parquet(
        paths["reflect_both"]
    )
    with pytest.raises(FileLayoutError, match=r"reflect_both.parquet#row=3.*the Q file"):
        load_reflections(spec_of(tmp_path, reflections_entry(paths)))


def test_one_file_with_columns_per_variant_and_a_missing_answer(tmp_path):
    ori = originals(3)
    records = [
        {
            "prompt": r["instruction"],
            "context": r["input"],
            "answer": r["output"],
            "rewritten_prompt": f"Give a detailed account of item {i}.",
            "rewritten_answer": f"Item {i} has a long history of use.",
            "improved_answer": "" if i == 1 else f"A better answer for item {i}.",
        }
        for i, r in enumerate(ori)
    ]
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {
        "path": str(path),
        "fields": {"instruction": "prompt", "input": "context", "output": "answer"},
        "reflections": {
            "Q": {"path": str(path), "fields": {"instruction": "rewritten_prompt", "output": "rewritten_answer"}},
            "A": {"path": str(path), "fields": {"instruction": "prompt", "output": "improved_answer"}},
        },
    }
    files = load_reflections(spec_of(tmp_path, entry))
    assert files["Q"]["instruction"].to_list() == [f"Give a detailed account of item {i}." for i in range(3)]
    assert files["A"]["status"].to_list() == ["ok", "missing", "ok"]
    assert files["A"].row(1, named=True)["error"] == f"{path}#row=1: field 'improved_answer' is missing or empty"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"reflections": {"QA": "x.json"}}, "give the Q file too"),
        ({"reflections": {"B": "x.json"}}, "unknown variant"),
        ({"reflections": {"Q": {"path": "x.json", "columns": {}}}}, "unknown key"),
        ({"statistics": {"use": "sometimes", "ori": "x.json"}}, "'use' must be one of instead, compare"),
        ({"statistics": {"Q": "x.json"}}, "the 'ori' file is required"),
    ],
)
def test_the_catalog_says_what_is_wrong_with_a_files_entry(tmp_path, entry, message):
    with pytest.raises(SourceConfigError, match=message):
        spec_of(tmp_path, {"path": "s.json", **entry})


STATS_FILE = VariantFile("A", Path("/data/A.parquet"), "parquet", {"data": "data"})


def test_statistics_follow_the_authors_order():
    """loss and ppl lists in the order Q_direct, A_direct, Q_condition, A_condition."""
    row = statistics_row(STATS_FILE, 7, {"data": {"loss": [2.0, 1.0, 1.5, 0.5], "ppl": [8.0, 4.0, 6.0, 2.0]}})
    assert row["ifd"] == 0.5 and row["rifd"] == 0.75  # ppl_A_condition / ppl_A_direct, ppl_Q_condition / ppl_Q_direct
    assert row["ifd_loss"] == 0.5 and row["rifd_loss"] == 0.75 and row["ppl_Q_direct"] == 8.0
    as_text = statistics_row(STATS_FILE, 7, {"data": json.dumps({"ppl": [8.0, 4.0, 6.0, 2.0]})})
    assert as_text["ifd"] == 0.5 and "null_reason" not in as_text
    broken = statistics_row(STATS_FILE, 7, {"data": {"ppl": [8.0, float("nan"), 6.0, 2.0]}})
    assert broken["ifd"] is None and broken["null_reason"].startswith("/data/A.parquet#row=7: field 'data'")


def jsonl_statistics(directory: Path, rows: int) -> dict:
    """A JSONL source of ``rows`` rows and ori/A statistics files for it (ppl differ per row)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "src.jsonl").open("w") as out:
        out.writelines(json.dumps(row) + "\n" for row in originals(rows))
    entry: dict = {"path": str(directory / "src.jsonl"), "statistics": {"use": "instead"}}
    for variant in ("ori", "A"):
        with (directory / f"{variant}.jsonl").open("w") as out:
            for i in range(rows):
                ppl = [8.0 + i % 7, 4.0 + i % 5, 6.0, 2.0 + i % 3]
                out.write(json.dumps({"data": {"loss": [p / 10 for p in ppl], "ppl": ppl}}) + "\n")
        entry["statistics"][variant] = str(directory / f"{variant}.jsonl")
    return entry


def wanted_rows(rows: int) -> pl.DataFrame:
    """Every variant of every row, as student_scores asks (Q has no statistics file)."""
    return pl.DataFrame(
        [{"sample_id": f"s{i}", "variant": v, "row_index": i} for i in range(rows) for v in ("ori", "Q", "A")]
    )


def test_statistics_files_are_read_a_block_at_a_time(tmp_path, monkeypatch):
    """The scores match row by row what statistics_row makes of each record, whatever the block
    size; Python's peak while reading 4x the rows stays within 20% of 1x (all records were Python
    objects at once before: 12 GB for a million rows)."""
    import tracemalloc

    from srt_assets.core.from_files import load_statistics
    from srt_assets.core.ifd import score_schema

    monkeypatch.setattr("srt_assets.core.from_files.STATISTICS_BLOCK_ROWS", 200)
    small = spec_of(tmp_path / "small", jsonl_statistics(tmp_path / "small", 500))
    scores = load_statistics(small, wanted_rows(500), score_schema())
    record = json.loads((tmp_path / "small" / "A.jsonl").read_text().splitlines()[321])
    expected = statistics_row(small.statistics.files["A"], 321, record)
    row = scores.filter((pl.col("sample_id") == "s321") & (pl.col("variant") == "A")).row(0, named=True)
    assert row["ifd"] == expected["ifd"] and row["rifd"] == expected["rifd"] and row["null_reason"] is None
    assert scores.height == 1500 and scores["variant"].to_list()[:3] == ["ori", "Q", "A"]
    assert set(scores.filter(pl.col("variant") == "Q")["null_reason"]) == {"no statistics file for variant Q"}

    def peak(rows: int) -> int:
        spec = spec_of(tmp_path / str(rows), jsonl_statistics(tmp_path / str(rows), rows))
        wanted = wanted_rows(rows)
        tracemalloc.start()
        try:
            load_statistics(spec, wanted, score_schema())
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(8000) <= 1.2 * peak(2000)


def test_a_statistics_file_with_another_row_count_is_named(tmp_path):
    from srt_assets.core.from_files import load_statistics
    from srt_assets.core.ifd import score_schema

    entry = jsonl_statistics(tmp_path, 6)
    lines = (tmp_path / "A.jsonl").read_text().splitlines()
    (tmp_path / "A.jsonl").write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(FileLayoutError, match=r"statistics\.A: .*A\.jsonl has 5 rows, the source file .* has 6"):
        load_statistics(spec_of(tmp_path, entry), wanted_rows(6), score_schema())


def test_rank_and_decision_agreement():
    ids = [f"s{i}" for i in range(6)]
    ours = pl.DataFrame({"sample_id": ids, "variant": "ori", "ifd": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "rifd": 0.5})
    same_order = ours.with_columns(pl.col("ifd") * 3, pl.Series("rifd", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    table = {(r["statistic"], r["variant"]): r for r in rank_agreement(ours, same_order).iter_rows(named=True)}
    assert table[("ifd", "ori")]["spearman"] == pytest.approx(1.0) and table[("ifd", "ori")][
        "kendall"
    ] == pytest.approx(1.0)
    assert table[("rifd", "all")]["spearman"] is None  # ours is constant: no ranking to compare
    reversed_ = ours.with_columns(pl.col("ifd").reverse())
    assert rank_agreement(ours, reversed_).row(0, named=True)["spearman"] == pytest.approx(-1.0)
    decisions = pl.DataFrame(
        {"sample_id": ids, "selected": [True, True, False, False, True, False], "chosen_variant": "A"}
    )
    theirs = decisions.with_columns(pl.Series("selected", [True, False, False, True, True, False]))
    summary = decision_agreement(decisions, theirs)
    assert (summary["selected_ours"], summary["selected_theirs"], summary["selected_both"]) == (3, 3, 2)
    assert summary["selected_ours_only"] == summary["selected_theirs_only"] == 1
    assert summary["kappa"] == pytest.approx((4 / 6 - 0.5) / 0.5)


# The selection each row is built to take, and the scores (IFD, r-IFD) per variant that make it take it.
SCENARIOS = {
    "QA": {"ori": (0.5, 0.9), "Q": (0.7, 0.8), "A": (0.4, 0.95), "QA": (0.6, 0.5)},  # selected: QA
    "A": {"ori": (0.6, 0.9), "Q": (0.5, 0.8), "A": (0.7, 0.6), "QA": (0.6, 0.5)},  # selected: A
    "QA over 1": {"ori": (0.5, 0.9), "Q": (0.7, 0.8), "A": (0.4, 0.95), "QA": (1.2, 0.5)},  # IFD(QA) ≥ 1: none
    "none": {"ori": (0.6, 0.7), "Q": (0.5, 0.8), "A": (0.7, 0.9), "QA": (0.6, 0.5)},  # A loses on r-IFD: none
}


def write_statistics(directory: Path, plan: list[str]) -> dict[str, Path]:
    """One file per variant in the authors' layout: a ``data`` record of loss and ppl lists (Q_direct,
    A_direct, Q_condition, A_condition), so that IFD and r-IFD come out as the plan says."""
    paths = {}
    for variant in ("ori", "Q", "A", "QA"):
        records = []
        for scenario in plan:
            ifd, rifd = SCENARIOS[scenario][variant]
            ppl = [10.0, 10.0, 10.0 * rifd, 10.0 * ifd]
            records.append({"data": {"loss": [round(p / 10, 4) for p in ppl], "ppl": ppl}})
        paths[variant] = directory / f"stats_{variant}.parquet"
        pl.DataFrame(records).write_parquet(paths[variant])
    return paths


def pipeline_defs(tmp_path: Path, entry: dict, server: ScriptedOpenAIServer, student: StudentModelResource | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    resources = {"teacher": OpenAIChatResource(model="scripted", base_url=server.base_url)}
    if student is not None:
        resources["student"] = student
    return build_definitions(
        sources_file=write_catalog(tmp_path, {"s": entry}), storage_dir=tmp_path / "store", resources=resources
    )


SELECTION = ["raw_samples", "raw_rejects", "new_instructions", "better_responses", "student_scores"]


@pytest.mark.integration
def test_released_reflections_and_statistics_reproduce_a_known_selection(tmp_path, dagster_instance):
    """The issue's bar: reflections in the four-split layout run through the selection with zero
    teacher calls, and statistics in the authors' layout reproduce the selection they were built for."""
    plan = [list(SCENARIOS)[i % len(SCENARIOS)] for i in range(10)]
    paths = authors_layout(tmp_path / "reflect", len(plan))
    stats = write_statistics(tmp_path / "reflect", plan)
    entry = reflections_entry(paths) | {
        "statistics": {"use": "instead", "label": "made-up Llama", **{v: str(p) for v, p in stats.items()}}
    }
    with ScriptedOpenAIServer() as server:
        defs = pipeline_defs(tmp_path, entry, server, None)
        keys = [*SELECTION, "sample_decisions", "score_agreement", "selected_dataset"]
        result = materialize(defs, "s", dagster_instance, selection=[_key(k) for k in keys])
        assert result.success
        assert server.requests == 0  # no teacher call at all
    store = tmp_path / "store"
    decisions = pl.read_parquet(store / "sample_decisions" / "s.parquet")
    raw = pl.read_parquet(store / "raw_samples" / "s.parquet")
    chosen = dict(zip(decisions["sample_id"], decisions["chosen_variant"], strict=True))
    expected = [s if s in ("QA", "A") else None for s in plan]
    assert [chosen[sid] for sid in raw.sort("row_index")["sample_id"]] == expected
    assert latest_metadata(dagster_instance, "sample_decisions")["selected"] == plan.count("QA") + plan.count("A")
    assert latest_metadata(dagster_instance, "student_scores")["model_loaded"] is False
    assert latest_metadata(dagster_instance, "new_instructions")["calls_made"] == 0
    agreement = latest_metadata(dagster_instance, "score_agreement")
    assert agreement["selected_theirs"] == agreement["selected_ours"] == agreement["selected_both"]
    # every selected row names the file and row its texts came from
    selected = pl.read_parquet(store / "selected_dataset" / "s.parquet")
    assert selected.height == plan.count("QA") + plan.count("A")
    for row in selected.iter_rows(named=True):
        split = "reflect_both" if row["variant"] == "QA" else "reflect_response"
        assert row["response_call_key"] == f"{paths[split]}#row={row['row_index']}"
        if row["variant"] == "QA":
            assert row["instruction_call_key"] == f"{paths['reflect_instruction']}#row={row['row_index']}"
    # and `srt explain` says where the texts came from
    sample = selected.row(0, named=True)
    story = format_story(explain_sample(sample["sample_id"], load_partition_tables(store, "s")))
    assert f"from {paths['reflect_instruction']}#row={sample['row_index']}" in story


@pytest.mark.integration
def test_score_agreement_decides_by_the_rule_its_decisions_table_holds(tmp_path, dagster_instance):
    """The comparison took its rule from the latest sample_decisions materialization in the event
    log: another instance over the same storage (a second machine) compared by the default rule."""
    from dagster import DagsterInstance

    plan = [list(SCENARIOS)[i % len(SCENARIOS)] for i in range(6)]
    paths = authors_layout(tmp_path / "reflect", len(plan))
    stats = write_statistics(tmp_path / "reflect", plan)
    entry = reflections_entry(paths) | {"statistics": {"use": "instead", **{v: str(p) for v, p in stats.items()}}}
    rule = {"keep_unreflected": True, "ifd_below": 0.9, "top_k": 2}
    with ScriptedOpenAIServer() as server:
        defs = pipeline_defs(tmp_path, entry, server, None)
        keys = [_key(k) for k in [*SELECTION, "sample_decisions"]]
        config = {"ops": {"sample_decisions": {"config": rule}}}
        assert materialize(defs, "s", dagster_instance, selection=keys, run_config=config).success
        with DagsterInstance.ephemeral(tempdir=str(tmp_path / "second_machine")) as second:
            assert materialize(defs, "s", second, selection=[_key("score_agreement")]).success
            compared_by = table_cells(latest_metadata(second, "score_agreement")["rule"])
    assert {name: compared_by[name] for name in rule} == {name: for_people(value) for name, value in rule.items()}


def _key(name: str):
    from dagster import AssetKey

    return AssetKey(name)


@pytest.mark.slow
def test_our_student_against_its_own_statistics_agrees_perfectly(tmp_path, dagster_instance, student_model_dir):
    """Compare mode with the real student: our scores written out in the authors' layout and read
    back as "theirs" agree exactly (every rank correlation 1, every decision the same)."""
    paths = authors_layout(tmp_path / "reflect", 6)
    student = StudentModelResource(model=str(student_model_dir), template="alpaca")
    with ScriptedOpenAIServer() as server:
        defs = pipeline_defs(tmp_path / "first", reflections_entry(paths), server, student)
        assert materialize(defs, "s", dagster_instance, selection=[_key(k) for k in SELECTION]).success
        ours = pl.read_parquet(tmp_path / "first" / "store" / "student_scores" / "s.parquet")
        raw = pl.read_parquet(tmp_path / "first" / "store" / "raw_samples" / "s.parquet").sort("row_index")
        stats = {}
        for variant in ("ori", "Q", "A", "QA"):
            part = raw.select("sample_id").join(ours.filter(pl.col("variant") == variant), on="sample_id", how="left")
            names = ["Q_direct", "A_direct", "Q_condition", "A_condition"]
            records = [
                {"data": {"ppl": [r[f"ppl_{n}"] for n in names], "loss": [r[f"loss_{n}"] for n in names]}}
                for r in part.iter_rows(named=True)
            ]
            stats[variant] = tmp_path / f"ours_{variant}.json"
            stats[variant].write_text(json.dumps(records))
        entry = reflections_entry(paths) | {"statistics": {"use": "compare", **{v: str(p) for v, p in stats.items()}}}
        defs = pipeline_defs(tmp_path / "first", entry, server, student)
        keys = [*SELECTION, "sample_decisions", "score_agreement"]
        assert materialize(defs, "s", dagster_instance, selection=[_key(k) for k in keys]).success
        assert server.requests == 0
    table = pl.read_parquet(tmp_path / "first" / "store" / "score_agreement" / "s.parquet")
    assert table.height == 10 and (table["rows"] == 24).sum() == 2  # 2 statistics × (4 variants + all)
    assert table["spearman"].drop_nulls().round(9).to_list() == [1.0] * table["spearman"].drop_nulls().len()
    assert table.filter(pl.col("variant") == "all")["kendall"].round(9).to_list() == [1.0, 1.0]
    summary = latest_metadata(dagster_instance, "score_agreement")
    assert summary["same_choice"] == summary["samples"] == 6
    assert latest_metadata(dagster_instance, "student_scores")["texts_computed"] == 0  # the rerun hit the cache


def test_a_sharded_partition_names_its_source():
    """The file-reading stages find their source's files from a shard's partition key too."""
    from dagster import StaticPartitionsDefinition

    from srt_assets.partitions import Partitioning

    sharded = Partitioning(StaticPartitionsDefinition(["alpaca", "demo"]), shards=3)
    keys = sharded.row_partitions.get_partition_keys()
    assert {sharded.source_name(key) for key in keys} == {"alpaca", "demo"} and len(keys) == 6
    assert Partitioning(StaticPartitionsDefinition(["demo"])).source_name("demo") == "demo"


def matched_layout(tmp_path: Path, n: int = 6) -> tuple[dict, list[dict], list[dict]]:
    """A source of ``n`` rows and an A file that answers some of them again, shuffled, once twice,
    with other whitespace: the layout of alpaca_gpt4_en_demo_999.json against Stanford Alpaca."""
    source = originals(n)
    answered = [source[4], source[1], source[1], source[3]]
    again = [{**row, "instruction": f"  {row['instruction']}\n", "output": f"A GPT-4 style answer to row {i}."}
             for i, row in zip((4, 1, 1, 3), answered, strict=True)]  # fmt: skip
    (tmp_path / "src.json").write_text(json.dumps(source), encoding="utf-8")
    (tmp_path / "gpt4.json").write_text(json.dumps(again), encoding="utf-8")
    entry = {
        "path": str(tmp_path / "src.json"),
        "reflections": {"A": {"path": str(tmp_path / "gpt4.json"), "match_on": ["instruction", "input"]}},
    }
    return entry, source, again


def test_a_matched_answer_file_pairs_rows_by_instruction_and_input(tmp_path):
    entry, _, _ = matched_layout(tmp_path)
    files = load_reflections(spec_of(tmp_path, entry))
    answers = files["A"].sort("row_index")
    assert answers["status"].to_list() == ["missing", "ok", "missing", "ok", "ok", "missing"]
    assert answers["output"][4] == "A GPT-4 style answer to row 4."
    assert answers["where"][1] == f"{tmp_path / 'gpt4.json'}#row=1"  # the first of the two identical records
    assert "holds no record with this row's instruction and input" in answers["error"][0]


def test_only_matched_reads_just_the_answered_rows_and_limit_counts_them(tmp_path):
    from srt_assets.core.from_files import matched_keys
    from srt_assets.core.raw import load_source

    entry, _, _ = matched_layout(tmp_path)
    spec = spec_of(tmp_path, entry | {"only_matched": True})
    samples, rejects = load_source(spec, matched_keys(spec))
    assert samples["row_index"].to_list() == [1, 3, 4] and rejects.height == 0
    limited = spec_of(tmp_path, entry | {"only_matched": True, "limit": 2})
    assert load_source(limited, matched_keys(limited))[0]["row_index"].to_list() == [1, 3]
    answers = load_reflections(spec)["A"]  # only the rows raw_samples holds, not a missing row per source row
    assert sorted(answers["row_index"]) == [1, 3, 4] and set(answers["status"]) == {"ok"}


def test_a_matched_key_given_twice_with_other_answers_is_refused(tmp_path):
    entry, _, again = matched_layout(tmp_path)
    again[2] = {**again[2], "output": "Another answer."}
    (tmp_path / "gpt4.json").write_text(json.dumps(again), encoding="utf-8")
    with pytest.raises(FileLayoutError, match=r"gpt4.json#row=2 and row 1 have the same instruction and input"):
        load_reflections(spec_of(tmp_path, entry))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reflections": {"Q": {"path": "q.json", "match_on": ["instruction"]}}}, "only 'A' takes it"),
        ({"reflections": {"A": {"path": "a.json", "match_on": ["output"]}}}, "'match_on' must list 'instruction'"),
        ({"reflections": {"A": "a.json"}, "only_matched": True}, "give such a file"),
        ({"only_matched": "yes"}, "'only_matched' must be true or false"),
    ],
)
def test_the_catalog_refuses_a_wrong_match(tmp_path, change, message):
    with pytest.raises(SourceConfigError, match=message):
        spec_of(tmp_path, {"path": "src.json", **change})


def test_a_path_may_start_with_the_shared_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SRT_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert spec_of(tmp_path, {"path": "$SRT_SHARED_DATA/a.json"}).path == tmp_path / "elsewhere" / "a.json"
    monkeypatch.delenv("SRT_SHARED_DATA")
    expected = (tmp_path / ".." / "shared" / "data" / "a.json").resolve()
    assert spec_of(tmp_path, {"path": "${SRT_SHARED_DATA}/a.json"}).path == expected

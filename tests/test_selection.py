"""The selection rule (docs/method.md, "Selection") on hand-made score tables: every branch, ties, NaN,
missing scores, the keep_unreflected option, the top-k stage, provenance and exports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl
import pytest
from conftest import in_fresh_interpreter, table_cells

from srt_assets.core.datasets import chosen_training_rows, export_dataset, original_training_rows, random_baseline
from srt_assets.core.provenance import (
    SampleNotFound,
    explain_sample,
    format_story,
    provenance_columns,
    sample_story,
    source_of,
)
from srt_assets.core.selection import DECISION_SCHEMA as DECISIONS
from srt_assets.core.selection import SelectionRule, branch_counts, decide, select, unavailable_table
from srt_assets.defs.partitions import SOURCES
from srt_assets.plots import for_people


def scores(**pairs: tuple[float | None, float | None]) -> tuple[dict, dict]:
    """``scores(ori=(ifd, rifd), Q=(...), ...)`` → (ifd by variant, rifd by variant)."""
    return {v: p[0] for v, p in pairs.items()}, {v: p[1] for v, p in pairs.items()}


PAPER = SelectionRule()
KEEP_ALL = SelectionRule(keep_unreflected=True)


@pytest.mark.parametrize(
    ("case", "rule", "branch", "chosen"),
    [
        # Q beats ori, QA beats Q, QA passes both filters → QA
        (scores(ori=(0.5, 0.6), Q=(0.7, 0.8), A=(0.4, 0.5), QA=(0.6, 0.7)), PAPER, "QA", "QA"),
        # Q beats ori, QA does not beat Q → nothing by default, Q with keep_unreflected
        (scores(ori=(0.5, 0.6), Q=(0.7, 0.3), A=(0.4, 0.5), QA=(0.6, 0.7)), PAPER, "Q", None),
        (scores(ori=(0.5, 0.6), Q=(0.7, 0.3), A=(0.4, 0.5), QA=(0.6, 0.7)), KEEP_ALL, "Q", "Q"),
        # Q loses, A beats ori → A
        (scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.4, 0.5), QA=(0.6, 0.1)), PAPER, "A", "A"),
        # Q loses, A loses → nothing; ori with keep_unreflected
        (scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.4, 0.9), QA=(0.6, 0.1)), PAPER, "ori", None),
        (scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.4, 0.9), QA=(0.6, 0.1)), KEEP_ALL, "ori", "ori"),
        # ties reject: IFD(Q) == IFD(ori) goes to the A branch; rIFD(A) == rIFD(ori) rejects A
        (scores(ori=(0.7, 0.6), Q=(0.7, 0.8), A=(0.4, 0.6), QA=(0.6, 0.1)), PAPER, "ori", None),
        # the candidate fails a < 1 filter (rIFD, then IFD; 1.0 itself fails)
        (scores(ori=(0.5, 1.3), Q=(0.7, 1.4), A=(0.4, 0.5), QA=(0.6, 1.2)), PAPER, "QA", None),
        (scores(ori=(0.5, 0.6), Q=(1.3, 0.8), A=(0.4, 0.5), QA=(1.0, 0.7)), PAPER, "QA", None),
        # NaN and missing scores never win a comparison
        (scores(ori=(0.5, 0.6), Q=(math.nan, 0.8), A=(0.4, 0.5), QA=(0.6, 0.7)), PAPER, "A", "A"),
        (scores(ori=(0.5, 0.6), Q=(0.7, 0.8), A=(0.4, 0.5), QA=(0.6, None)), PAPER, "Q", None),
        # lazy mode: only the picked branch was reflected
        (scores(ori=(0.5, 0.6), Q=(0.7, 0.8), QA=(0.6, 0.7)), PAPER, "QA", "QA"),
        (scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.4, 0.5)), PAPER, "A", "A"),
    ],
)
def test_decide_every_branch(case, rule, branch, chosen):
    ifd, rifd = case
    decision = decide(ifd, rifd, rule)
    assert (decision.branch, decision.chosen_variant) == (branch, chosen)
    assert decision.reason  # every decision says why


def test_reason_names_the_compared_scores():
    ifd, rifd = scores(ori=(0.5, 0.6), Q=(0.7, 1.5), A=(0.4, 0.5), QA=(0.6, 1.2))
    reason = decide(ifd, rifd, PAPER).reason
    assert "IFD(Q)=0.7 > IFD(ori)=0.5" in reason
    assert "rIFD(QA)=1.2 not < 1.0" in reason


def test_a_failed_or_copied_candidate_is_named_for_what_it_is():
    """The demo's reasons read "IFD(Q)=0.3366 not > IFD(ori)=0.3366": Q's rewrite had failed to parse
    and fallen back to the original, so its scores were ori's. The reason now says so, and a copy of
    another variant is no candidate even where noise would let it win a comparison."""
    ifd, rifd = scores(ori=(0.33655136283776277, 0.6), Q=(0.33655136283776277, 0.6), A=(0.2, 0.5), QA=(0.2, 0.5))
    decision = decide(ifd, rifd, PAPER, unavailable={"Q": "parse_failed", "QA": "copy of A"})
    assert (decision.branch, decision.chosen_variant) == ("A", "A")
    assert decision.reason.startswith("Q: parse_failed — not a candidate; rIFD(A)=0.5 < rIFD(ori)=0.6")
    assert "0.3366" not in decision.reason  # no comparison with a fallback's copied score
    # a copy whose score drifted above its source's (padding, batch noise) still does not win
    ifd, rifd = scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.3, 0.5999), QA=(0.6, 0.1))
    assert decide(ifd, rifd, PAPER).chosen_variant == "A"
    copied = decide(ifd, rifd, PAPER, unavailable={"A": "copy of ori"})
    assert copied.chosen_variant is None and "A: copy of ori — not a candidate" in copied.reason
    # failures bind even where the rule ignores quality flags; with keep_unreflected the source stands
    lenient = SelectionRule(respect_quality_flags=False, keep_unreflected=True)
    assert decide(ifd, rifd, lenient, unavailable={"A": "call_failed"}).chosen_variant == "ori"


def test_unavailable_candidates_from_statuses_and_texts(tiny_pipeline_tables):
    """Failed reflections are named by their status, unchanged texts as copies of the earlier variant;
    the decisions record them in their ``unavailable`` column and ``srt explain`` marks the scores."""
    raw, inst, resp, _ = tiny_pipeline_tables
    first, second, third = TINY_IDS
    fallback = pl.col("sample_id") == first
    inst = inst.with_columns(  # sample 0: the instruction rewrite failed and fell back to the original
        pl.when(fallback).then(pl.lit("parse_failed")).otherwise("status").alias("status"),
        pl.when(fallback).then(pl.lit("i0")).otherwise("instruction").alias("instruction"),
        pl.when(fallback).then(pl.lit("o0")).otherwise("output").alias("output"),
    )
    resp = resp.with_columns(  # sample 0: QA then reflects what A reflected; sample 1: A returned ori's answer
        pl.when(fallback).then(pl.lit("i0")).otherwise("instruction").alias("instruction"),
        pl.when(fallback & (pl.col("variant") == "QA")).then(pl.lit("A-0"))
        .when((pl.col("sample_id") == second) & (pl.col("variant") == "A")).then(pl.lit("o1"))
        .otherwise("output").alias("output"),
        pl.when(pl.col("sample_id") == second).then(pl.lit("x")).otherwise("input").alias("input"),
    )  # fmt: skip
    found = unavailable_table(raw, inst, resp)
    assert found.rows() == [(first, "Q", "parse_failed"), (first, "QA", "copy of A"), (second, "A", "copy of ori")]
    assert unavailable_table(raw.lazy(), inst.lazy(), resp.lazy()).collect().equals(found)  # as a scan

    table = score_table(dict(zip(TINY_IDS, [make_table()["s-a1"]] * 3, strict=True)))
    decisions = select(TINY_IDS, table, PAPER, unavailable=found)
    by_id = {row["sample_id"]: row for row in decisions.iter_rows(named=True)}
    assert by_id[first]["unavailable"] == "Q: parse_failed; QA: copy of A"
    assert by_id[first]["reason"].startswith("Q: parse_failed — not a candidate")
    assert by_id[second]["chosen_variant"] is None and "A: copy of ori — not a candidate" in by_id[second]["reason"]
    assert by_id[third]["unavailable"] is None and by_id[third]["chosen_variant"] == "A"
    scored = table.filter(pl.col("sample_id") == first)
    story = format_story(explain_sample(first, {"raw_samples": raw, "student_scores": scored,
                                                "sample_decisions": decisions}))  # fmt: skip
    assert "  Q: IFD 0.7  r-IFD 0.8  (parse_failed — not a candidate)" in story
    assert "not candidates: Q: parse_failed; QA: copy of A" in story


def score_table(per_sample: dict[str, tuple[dict, dict]]) -> pl.DataFrame:
    rows = [
        {"sample_id": sid, "variant": v, "ifd": ifd[v], "rifd": rifd[v]}
        for sid, (ifd, rifd) in per_sample.items()
        for v in ifd
    ]
    return pl.DataFrame(
        rows, schema={"sample_id": pl.String, "variant": pl.String, "ifd": pl.Float64, "rifd": pl.Float64}
    )


def make_table():
    return {
        "s-qa1": scores(ori=(0.5, 0.6), Q=(0.7, 0.8), A=(0.4, 0.5), QA=(0.6, 0.7)),
        "s-qa2": scores(ori=(0.5, 0.6), Q=(0.9, 0.8), A=(0.4, 0.5), QA=(0.8, 0.7)),
        "s-a1": scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.3, 0.5), QA=(0.6, 0.1)),
        "s-q": scores(ori=(0.5, 0.6), Q=(0.7, 0.3), A=(0.4, 0.5), QA=(0.6, 0.7)),
        "s-ori": scores(ori=(0.8, 0.6), Q=(0.7, 0.8), A=(0.4, 0.9), QA=(0.6, 0.1)),
    }


def test_select_counts_and_top_stage():
    table = score_table(make_table())
    ids = [*make_table(), "s-unscored"]
    decisions = select(ids, table, PAPER)
    assert decisions["sample_id"].to_list() == ids
    counts = branch_counts(decisions)
    assert counts == {"QA": 2, "Q": 1, "A": 1, "ori": 2, "kept": 3, "selected": 3}
    unscored = decisions.filter(pl.col("sample_id") == "s-unscored").row(0, named=True)
    assert unscored["chosen_variant"] is None and "no student scores" in unscored["reason"]

    top2 = select(ids, table, SelectionRule(top_k=2))
    selected = top2.filter(pl.col("selected"))
    # highest IFD first: s-qa2 (0.8), s-qa1 (0.6); s-a1 (0.3) is kept but cut
    assert selected["sample_id"].to_list() == ["s-qa1", "s-qa2"]
    cut = top2.filter(pl.col("sample_id") == "s-a1").row(0, named=True)
    assert cut["kept"] and not cut["selected"] and cut["ifd_rank"] == 3 and "below the top 2" in cut["reason"]
    assert branch_counts(select(ids, table, SelectionRule(top_percent=34)))["selected"] == 2  # ceil(3 * 0.34)
    with pytest.raises(ValueError, match="at most one"):
        SelectionRule(top_k=1, top_percent=5)


@pytest.mark.parametrize("rule", [PAPER, SelectionRule(top_k=2), SelectionRule(top_percent=50)])
def test_decisions_written_block_by_block_equal_the_rule_held_in_memory(tmp_path, monkeypatch, rule):
    """Blocks of two samples (so the top stage ranks across blocks): the staged table is exactly
    ``select``'s, flags and failed candidates included, and only the final file is left."""
    import srt_assets.core.selection as selection
    from srt_assets.core.files import ParquetBlockWriter

    monkeypatch.setattr(selection, "DECISION_BLOCK_ROWS", 2)
    table = score_table(make_table())
    ids = [*make_table(), "s-unscored"]
    flags = pl.DataFrame({"sample_id": ["s-q"], "variant": ["QA"], "flags": [["repetition"]]})
    why = pl.DataFrame({"sample_id": ["s-qa1"], "variant": ["Q"], "why": ["parse_failed"]})
    facts = selection.sample_facts(pl.LazyFrame({"sample_id": ids}), table.lazy(), flags.lazy(), why.lazy())
    staged = selection.write_decisions(facts, rule, lambda: ParquetBlockWriter(tmp_path / "d.parquet", DECISIONS))
    written = staged.scan().collect()
    expected = select(ids, table, rule, flags, why)
    assert written.equals(expected)
    kept = int(written["kept"].sum())
    assert kept >= 2 and sorted(written["ifd_rank"].drop_nulls()) == list(range(1, kept + 1))  # one ranking
    assert [p.name for p in tmp_path.iterdir()] == [staged.path.name]  # the first pass's file is gone


def write_decision_inputs(folder: Path, rows: int) -> None:
    """The four inputs of ``sample_decisions`` for ``rows`` samples as Parquet files, with realistic
    texts (~220 characters a field)."""
    words = " ".join(["texts of a realistic length"] * 8)
    text = pl.Series([f"item {i}: {words}" for i in range(rows)])
    raw = pl.DataFrame({"sample_id": [f"demo-{i:016x}" for i in range(rows)], "source": "demo",
                        "row_index": range(rows), "instruction": text, "input": "", "output": text})  # fmt: skip
    ok = {"status": pl.lit("ok"), "error": pl.lit(None, pl.String()), "attempts": pl.lit(1),
          "rejecting_flags": pl.lit([], pl.List(pl.String())),
          "cache_key": pl.col("sample_id").hash().cast(pl.String)}  # fmt: skip
    inst = raw.select("sample_id", variant=pl.lit("Q"), instruction="Q " + pl.col("instruction"), input=pl.lit(""),
                      output="y1 " + pl.col("output"), **ok)  # fmt: skip
    resp = pl.concat([inst.with_columns(variant=pl.lit(v), output=f"{v} " + pl.col("output")) for v in ("A", "QA")])
    scores = pl.concat(
        [raw.select("sample_id", variant=pl.lit(v), ifd=pl.lit(0.5 + k / 10), rifd=pl.lit(0.9 - k / 10))
         for k, v in enumerate(("ori", "Q", "A", "QA"))]
    )  # fmt: skip
    for name, table in zip(INPUT_FILES, (raw, inst, resp, scores), strict=True):
        table.write_parquet(folder / f"{name}-{rows}.parquet", row_group_size=4096)


def selection_stage_peaks(folder: Path, sizes: list[int]) -> list[float]:
    """Peak RSS (MB) of this process after ``sample_decisions``, ``selected_dataset`` and
    ``baseline_teacher`` over each size's files in turn, the inputs handed over as scans (as the IO
    manager does)."""
    import resource

    from dagster import Output, build_asset_context

    from srt_assets.defs.selection.assets import (
        SelectedDatasetConfig,
        SelectionConfig,
        baseline_teacher,
        sample_decisions,
        selected_dataset,
    )
    from srt_assets.paths import sources_file
    from srt_assets.resources import (
        SourceCatalogResource,
        StorageResource,
        StudentModelResource,
        TransformersChatResource,
    )

    def output(events) -> Output:
        [found] = [e for e in ([events] if isinstance(events, Output) else events) if isinstance(e, Output)]
        return found

    sources = SourceCatalogResource(sources_file=str(sources_file()))
    teacher = TransformersChatResource()
    peaks = []
    for rows in sizes:
        raw, inst, resp, scores = (pl.scan_parquet(folder / f"{n}-{rows}.parquet") for n in INPUT_FILES)
        storage = StorageResource(base_dir=str(folder / f"store-{rows}"))
        context = build_asset_context(partition_key="demo")
        decisions = output(sample_decisions(context, SelectionConfig(), raw, inst, resp, scores, storage)).value
        assert decisions.rows == rows
        chosen = selected_dataset(context, SelectedDatasetConfig(), raw, inst, resp, decisions.scan(), sources=sources,
                                  storage=storage, teacher=teacher, student=StudentModelResource())  # fmt: skip
        assert output(chosen).value.rows == rows  # every sample selected (QA): all the texts pass through
        everything = baseline_teacher(context, raw, inst, resp, storage=storage, sources=sources, teacher=teacher)
        assert output(everything).value.rows == rows
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return peaks


INPUT_FILES = ("raw", "inst", "resp", "scores")


@pytest.mark.integration
def test_selection_memory_follows_the_block_not_the_rows(tmp_path: Path):
    """Deciding, then gathering the selected and the teacher sets of, 80,000 samples after 20,000 in
    one fresh interpreter: what grows is ids and numbers (polars' join tables of keys, scores and text
    hashes, the ranks: ~1.0 KB a sample measured), never the texts or a Python record per sample
    (when the stages read their inputs whole and held every record: 5.9 KB a sample for the
    decisions alone)."""
    for rows in (20_000, 80_000):
        write_decision_inputs(tmp_path, rows)
    small, large = in_fresh_interpreter("test_selection", "selection_stage_peaks", tmp_path, [20_000, 80_000])
    assert (large - small) * 2**20 / 60_000 <= 1536, (small, large)  # bytes per extra sample: ids and numbers


TINY_IDS = ["demo-" + c * 16 for c in "abc"]


@pytest.fixture
def tiny_scores() -> pl.DataFrame:
    """Student scores of the three samples: a QA branch, an A branch and a rejected one."""
    tables = make_table()
    return score_table(dict(zip(TINY_IDS, [tables["s-qa1"], tables["s-a1"], tables["s-ori"]], strict=True)))


@pytest.fixture
def tiny_pipeline_tables(tiny_scores):
    """Raw rows, teacher candidates and decisions for three samples, as the assets store them."""
    ids = TINY_IDS
    raw = pl.DataFrame(
        {
            "sample_id": ids,
            "source": ["demo"] * 3,
            "row_index": [0, 1, 2],
            "instruction": ["i0", "i1", "i2"],
            "input": ["", "x", ""],
            "output": ["o0", "o1", "o2"],
        }
    )
    candidate = {"status": "ok", "error": None, "raw_text": "teacher says", "attempts": 1}
    inst = pl.DataFrame(
        [{"sample_id": s, "variant": "Q", "instruction": f"Q{i}", "input": "", "output": f"y1-{i}",
          "cache_key": f"q{i}", **candidate} for i, s in enumerate(ids)]
    )  # fmt: skip
    resp = pl.DataFrame(
        [{"sample_id": s, "variant": v, "instruction": f"Q{i}" if v == "QA" else f"i{i}", "input": "",
          "output": f"{v}-{i}", "cache_key": f"{v}{i}", **candidate} for i, s in enumerate(ids) for v in ("A", "QA")]
    )  # fmt: skip
    decisions = select(ids, tiny_scores, PAPER)
    return raw, inst, resp, decisions


def test_training_rows_provenance_and_explain(tiny_pipeline_tables, tmp_path):
    from srt_assets.core.variants import all_variants

    raw, inst, resp, decisions = tiny_pipeline_tables
    variants = all_variants(raw, inst, resp)
    rows = chosen_training_rows(raw, variants, decisions)
    assert rows["variant"].to_list() == ["QA", "A"]
    assert rows["output"].to_list() == ["QA-0", "A-1"]
    assert rows["instruction"].to_list() == ["Q0", "i1"]  # QA keeps the new instruction, A the original
    prov = provenance_columns(decisions, inst, resp, "/data/demo.jsonl")
    assert prov["instruction_call_key"].to_list() == ["q0", None]
    assert prov["response_call_key"].to_list() == ["QA0", "A1"]

    story = explain_sample(raw["sample_id"][0], {"raw_samples": raw, "new_instructions": inst,
                                                   "better_responses": resp, "sample_decisions": decisions,
                                                   "selected_dataset": rows})  # fmt: skip
    assert story["in_selected_dataset"] and story["source"] == "demo"
    text = format_story(story)
    assert "teacher says" in text and "branch QA, chosen QA" in text
    with pytest.raises(ValueError, match="not a sample id"):
        source_of("nodash", ["demo"])

    written = export_dataset(rows, tmp_path, "selected_dataset")
    records = json.loads(written["alpaca_json"].read_text())
    assert [r["output"] for r in records] == ["QA-0", "A-1"] and records[0]["sample_id"] == rows["sample_id"][0]
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(str(written["hf_dataset"]), split="train")
    assert loaded["output"] == ["QA-0", "A-1"]


def test_a_sample_id_never_names_a_path_outside_the_catalog(tmp_path: Path):
    """``srt explain /x/y-<hex>`` read /x/y.parquet and its error told whether a file existed; now
    only catalog sources are looked up, and every refusal reads the same whatever is on disk."""
    storage, elsewhere = tmp_path / "storage", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pl.DataFrame({"sample_id": [f"{elsewhere}/secret-0123456789abcdef"], "instruction": ["private"]}).write_parquet(
        elsewhere / "secret.parquet"
    )
    refusals = []
    for name in ("secret", "absent"):
        with pytest.raises(SampleNotFound, match="is not in the catalog") as refused:
            sample_story(f"{elsewhere}/{name}-0123456789abcdef", storage, ["demo"])
        refusals.append(str(refused.value).replace(name, "NAME"))
    assert refusals[0] == refusals[1]
    with pytest.raises(SampleNotFound, match="not a sample id"):
        sample_story("demo-0123456789ABCDEZ", storage, ["demo"])


def test_a_story_from_tables_missing_columns_is_still_told():
    """A table from an older schema (no cache_key, no variant) crashed the story with a KeyError."""
    raw = pl.DataFrame({"sample_id": ["s-0123456789abcdef"], "row_index": [0], "instruction": ["i"], "output": ["o"]})
    odd = pl.DataFrame({"sample_id": ["s-0123456789abcdef"], "instruction": ["i2"]})
    story = explain_sample("s-0123456789abcdef", {"raw_samples": raw, "new_instructions": odd,
                                                  "student_scores": odd, "sample_decisions": odd})  # fmt: skip
    text = format_story(story)
    assert "instruction: i2" in text and "status None" in text


def test_sample_decisions_is_a_module_level_asset_a_test_can_call(tiny_pipeline_tables, tiny_scores, tmp_path):
    """The stage's asset runs on a context built in the test, over real small tables: one decision per
    raw sample, as the pure rule makes them, and its blocking check."""
    from dagster import AssetCheckResult, Output, build_asset_context

    from srt_assets.defs.selection.assets import SelectionConfig, sample_decisions
    from srt_assets.resources import StorageResource

    raw, inst, resp, expected = tiny_pipeline_tables
    unflagged = pl.lit([], dtype=pl.List(pl.String())).alias("rejecting_flags")
    events = list(
        sample_decisions(
            build_asset_context(partition_key=SOURCES.get_partition_keys()[0]),
            SelectionConfig(),
            raw.lazy(),  # the IO manager hands scans to this asset
            inst.with_columns(unflagged).lazy(),
            resp.with_columns(unflagged).lazy(),
            tiny_scores.lazy(),
            StorageResource(base_dir=str(tmp_path)),
        )
    )
    [output] = [e for e in events if isinstance(e, Output)]
    written = output.value.scan().collect()  # a staged file, written a block at a time
    assert written.equals(expected)  # the same records as the rule held in memory
    assert written.select("sample_id", "chosen_variant").equals(expected.select("sample_id", "chosen_variant"))
    assert output.metadata["selected"].value == 2
    shown = output.metadata["decisions_preview"].value
    assert "showing 3 of 3 rows" in shown and f"sample_id: {raw['sample_id'][0]}\n" in shown  # explain config
    whole_row = table_cells(shown.split("explain_sample config")[0].strip().split("\n\n")[-1])  # the first row, whole
    assert whole_row["ifd_ori"] == for_people(written["ifd_ori"][0])  # its scores too
    assert "| IFD\\, original rows | 0\\.5 |" in output.metadata["scores"].value  # a table, not a JSON block
    assert "| ifd\\_below | 1 |" in output.metadata["rule"].value
    assert "showing 0 of 0 rows" in output.metadata["failed_reflections"].value
    described = sample_decisions.metadata_by_key[sample_decisions.key]["dagster/column_schema"].columns
    assert all(column.description for column in described)
    assert [(e.check_name, e.passed) for e in events if isinstance(e, AssetCheckResult)] == [
        ("one_decision_per_raw_sample", True)
    ]


def shown_text(markdown: str) -> str:
    """Markdown as the reader sees it: the backslash escapes of untrusted text removed."""
    return re.sub(r"\\(.)", r"\1", markdown)


def test_sample_decisions_lists_failed_reflections_and_names_them_in_reasons(
    tiny_pipeline_tables, tiny_scores, tmp_path
):
    """A failed rewrite falls back to the original: the decisions say so and the asset lists it."""
    from dagster import Output, build_asset_context

    from srt_assets.defs.selection.assets import SelectionConfig, sample_decisions
    from srt_assets.resources import StorageResource

    raw, inst, resp, _ = tiny_pipeline_tables
    unflagged = pl.lit([], dtype=pl.List(pl.String())).alias("rejecting_flags")
    failed = pl.col("sample_id") == TINY_IDS[1]
    inst = inst.with_columns(
        unflagged,
        pl.when(failed).then(pl.lit("parse_failed")).otherwise("status").alias("status"),
        pl.when(failed).then(pl.lit("no [New Instruction] marker")).otherwise("error").alias("error"),
    )
    context = build_asset_context(partition_key="demo")
    storage = StorageResource(base_dir=str(tmp_path))
    tables = (raw, inst, resp.with_columns(unflagged), tiny_scores)
    events = sample_decisions(context, SelectionConfig(), *(table.lazy() for table in tables), storage)
    [output] = [e for e in events if isinstance(e, Output)]
    row = output.value.scan().collect().filter(pl.col("sample_id") == TINY_IDS[1]).row(0, named=True)
    assert row["reason"].startswith("Q: parse_failed — not a candidate") and row["unavailable"] == "Q: parse_failed"
    listed = shown_text(output.metadata["failed_reflections"].value)
    assert "showing 1 of 1 rows" in listed and "| Q | parse_failed | no [New Instruction] marker |" in listed
    assert "| Q: parse_failed | 1 |" in shown_text(output.metadata["not_candidates"].value)
    assert "Q: parse_failed — not a candidate" in shown_text(output.metadata["decisions_preview"].value)


def test_random_baseline_is_reproducible(tiny_pipeline_tables):
    raw = original_training_rows(tiny_pipeline_tables[0])
    first = random_baseline(raw, 2, seed=7)
    assert first.height == 2 and first.equals(random_baseline(raw, 2, seed=7))
    assert set(first["sample_id"]) <= set(raw["sample_id"])
    assert random_baseline(raw, 10, seed=7).height == raw.height
    draws = {tuple(random_baseline(raw, 1, seed=s)["sample_id"]) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_every_exported_set_carries_a_dataset_card_with_the_source_licence(tiny_pipeline_tables, tmp_path):
    """The exported hf/ folder had a one-line card: no licence (Alpaca's CC BY-NC 4.0 was not passed
    on), no source, size, method or settings. Each training set's card now has the Hub's front matter
    (licence from the catalog) and says how the set was made; datasets and huggingface_hub read it."""
    datasets = pytest.importorskip("datasets")
    from dagster import Output, build_asset_context
    from huggingface_hub import DatasetCard

    from srt_assets.core.variants import all_variants
    from srt_assets.defs.selection.assets import (
        RandomBaselineConfig,
        SelectedDatasetConfig,
        baseline_full,
        baseline_random,
        selected_dataset,
    )
    from srt_assets.paths import sources_file
    from srt_assets.resources import (
        SourceCatalogResource,
        StorageResource,
        StudentModelResource,
        TransformersChatResource,
    )

    raw, inst, resp, decisions = tiny_pipeline_tables
    sources = SourceCatalogResource(sources_file=str(sources_file()))
    storage = StorageResource(base_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    context = build_asset_context(partition_key="demo")
    models = {"teacher": TransformersChatResource(), "student": StudentModelResource()}
    scans = [table.lazy() for table in (raw, inst, resp, decisions)]  # as the IO manager hands them over
    events = selected_dataset(context, SelectedDatasetConfig(), *scans, sources=sources, storage=storage, **models)
    [selected] = [e for e in events if isinstance(e, Output)]
    assert chosen_training_rows(raw, all_variants(raw, inst, resp), decisions).height == selected.value.rows == 2
    full = baseline_full(build_asset_context(partition_key="demo"), raw.lazy(), storage=storage, sources=sources)
    drawn = baseline_random(build_asset_context(partition_key="demo"), RandomBaselineConfig(seed=3), raw.lazy(),
                            selected.value.scan(), storage=storage, sources=sources)  # fmt: skip
    for name, output, variants in (("selected_dataset", selected, "| QA | 1 |"), ("baseline_full", full, "| ori | 3 |"),
                                   ("baseline_random", drawn, "| ori | 2 |")):  # fmt: skip
        folder = Path(output.metadata["hf_dataset"].value)
        assert folder == tmp_path / "exports" / name / "demo" / "hf"
        # datasets keys its cache by the files' mtimes only: sets written in one tick would share an entry
        loaded = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf-cache" / name))
        assert loaded["sample_id"] == output.value.scan().collect()["sample_id"].to_list()
        card = DatasetCard.load(folder / "README.md")
        assert card.data.license == "cc-by-nc-4.0"  # from sources.yaml's "CC BY-NC 4.0"
        assert card.data.source_datasets == ["extended|tatsu-lab/alpaca"]
        assert card.data.size_categories == ["n<1K"] and card.data.task_categories == ["text-generation"]
        assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
        assert f"of the {raw.height} rows of the source" in card.text and "CC BY-NC 4.0" in card.text
        assert variants in card.text and "| sample_id | the raw row" in card.text
    card = DatasetCard.load(Path(selected.metadata["hf_dataset"].value) / "README.md").text
    assert "Selective Reflection-Tuning" in card and "| rule.ifd_below | `1.0` |" in card
    assert "| teacher.backend | `transformers` |" in card and "| student.max_length |" in card  # a row each
    assert "| rule.top_k | not set |" in card and "null" not in card  # an unset rule setting says so
    assert "| decision_reason | why the selection" in card
    assert "| seed | `3` |" in DatasetCard.load(Path(drawn.metadata["hf_dataset"].value) / "README.md").text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CC BY-NC 4.0", ("cc-by-nc-4.0", None)),
        ("derived from Alpaca (CC BY-NC 4.0)", ("cc-by-nc-4.0", None)),
        ("CC-BY-SA-4.0", ("cc-by-sa-4.0", None)),
        ("Apache 2.0", ("apache-2.0", None)),
        ("research use only", ("other", "research use only")),
        ("", ("unknown", None)),
    ],
)
def test_catalog_licences_become_hub_licence_ids(text, expected):
    from srt_assets.core.datasets import hub_license

    assert hub_license(text) == expected


def test_explain_sample_with_an_empty_id_names_ids_that_exist(tiny_pipeline_tables, tmp_path):
    """The launchpad scaffolds ``sample_id: ''`` and gave no hint what to put there; the refusal now
    names ids of the materialized raw samples."""
    from dagster import build_op_context

    from srt_assets.defs.audit.jobs import ExplainSampleConfig, explain_sample_op
    from srt_assets.paths import sources_file
    from srt_assets.resources import SourceCatalogResource, StorageResource

    raw = tiny_pipeline_tables[0]
    (tmp_path / "raw_samples").mkdir()
    raw.write_parquet(tmp_path / "raw_samples" / "demo.parquet")
    resources = {
        "storage": StorageResource(base_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")),
        "sources": SourceCatalogResource(sources_file=str(sources_file())),
    }
    with pytest.raises(SampleNotFound, match="not a sample id") as refused:
        explain_sample_op(build_op_context(resources=resources), ExplainSampleConfig(sample_id=""))
    assert f"ids that exist: {', '.join(raw['sample_id'])}" in str(refused.value)

"""Teacher assets end to end through Dagster, with the teacher behind a real local HTTP server."""

import math
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import alpaca_rows, latest_metadata, materialize, table_cells, write_catalog, write_jsonl
from openai_server import ScriptedOpenAIServer, scripted_reply

from srt_assets.definitions import build_definitions
from srt_assets.resources import OpenAIChatResource, StudentModelResource

pytestmark = pytest.mark.slow
KEY = "sk-srt-test-5d1e-do-not-leak"


def pipeline(tmp_path: Path, server: ScriptedOpenAIServer, student_dir: Path, **teacher_options):
    rows = alpaca_rows(2, with_input=1)
    rows.append({"instruction": "Say hi. FAULT:nomarkers", "input": "", "output": "Hi."})
    write_jsonl(tmp_path / "s.jsonl", rows)
    return build_definitions(
        sources_file=write_catalog(tmp_path, {"s": {"path": "s.jsonl"}}),
        storage_dir=tmp_path / "store",
        resources={
            "student": StudentModelResource(model=str(student_dir), template="alpaca"),
            "teacher": OpenAIChatResource(
                model="scripted", base_url=server.base_url, api_key_env="SRT_TEST_TEACHER_KEY", **teacher_options
            ),
        },
    )


# one of the four rows is made to fail parsing: above the strict default bound of 10%
LOOSE = {"ops": {name: {"config": {"max_failure_ratio": 0.5}} for name in ("new_instructions", "better_responses")}}


def run(defs, instance):
    return materialize(defs, "s", instance, upto="student_scores", run_config=LOOSE)


metadata = latest_metadata


def test_reflection_to_scores_then_rerun_makes_no_calls(tmp_path, dagster_instance, student_model_dir, monkeypatch):
    monkeypatch.setenv("SRT_TEST_TEACHER_KEY", KEY)
    with ScriptedOpenAIServer(api_key=KEY) as server:
        defs = pipeline(tmp_path, server, student_model_dir)
        assert run(defs, dagster_instance).success
        store = tmp_path / "store"
        raw = pl.read_parquet(store / "raw_samples" / "s.parquet")
        questions = pl.read_parquet(store / "new_instructions" / "s.parquet")
        answers = pl.read_parquet(store / "better_responses" / "s.parquet")
        scores = pl.read_parquet(store / "student_scores" / "s.parquet")
        assert questions["sample_id"].to_list() == raw["sample_id"].to_list()
        assert questions["status"].to_list() == ["ok", "ok", "ok", "parse_failed"]
        fallback = questions.row(3, named=True)
        assert fallback["instruction"] == raw.row(3, named=True)["instruction"]  # the original, recorded as such
        assert fallback["raw_text"] == "I think the instruction is fine as it is."
        assert sorted(answers["variant"].unique()) == ["A", "QA"] and answers.height == 8  # eager: both branches
        failed = answers.filter(pl.col("status") != "ok")
        assert set(failed["sample_id"]) == {fallback["sample_id"]} and set(failed["status"]) == {"parse_failed"}
        assert (failed["output"] == "Hi.").all()  # the original response stands in
        assert scores.height == 16 and set(scores["variant"]) == {"ori", "Q", "A", "QA"}
        assert scores["ifd"].is_not_null().all()
        meta = metadata(dagster_instance, "new_instructions")
        assert meta["calls_made"] == 5 and meta["cache_hits"] == 0  # 4 rows + 1 retry after a parse failure
        assert table_cells(meta["outcomes"]) == {"ok": "3", "parse_failed": "1"}
        assert questions.filter(pl.col("status") == "ok")["finish_reason"].to_list() == ["stop"] * 3
        assert meta["replies_without_finish_reason"] == 0  # the server said how each reply ended
        requests = server.requests

        assert run(defs, dagster_instance).success
        assert server.requests == requests  # a rerun of a materialized partition makes zero calls
        assert metadata(dagster_instance, "better_responses")["calls_made"] == 0
        assert metadata(dagster_instance, "student_scores")["texts_computed"] == 0

    # The key reached the server, and nowhere else: not the files, not the event log.
    assert server.authorization == {f"Bearer {KEY}"}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    runs = dagster_instance.get_runs()
    assert len(runs) == 2
    for dagster_run in runs:
        assert KEY not in str(dagster_run.run_config)
        assert all(KEY not in str(entry) for entry in dagster_instance.all_logs(dagster_run.run_id))


def test_lazy_mode_reflects_only_the_kept_branch(tmp_path, dagster_instance, student_model_dir, monkeypatch):
    monkeypatch.setenv("SRT_TEST_TEACHER_KEY", KEY)
    with ScriptedOpenAIServer(api_key=KEY) as server:
        defs = pipeline(tmp_path, server, student_model_dir, mode="lazy")
        assert run(defs, dagster_instance).success
    answers = pl.read_parquet(tmp_path / "store" / "better_responses" / "s.parquet")
    scores = pl.read_parquet(tmp_path / "store" / "student_scores" / "s.parquet")
    assert answers.height == 4 and answers["sample_id"].n_unique() == 4  # one response call per sample
    by_sample = scores.pivot(on="variant", index="sample_id", values="ifd")
    for row in by_sample.iter_rows(named=True):
        expected = "QA" if row["Q"] > row["ori"] else "A"
        assert row.get(expected) is not None
        assert row.get("A" if expected == "QA" else "QA") is None
    assert metadata(dagster_instance, "student_scores")["texts_from_cache"] > 0  # phase-1 losses reused


def markup_in_new_instructions(messages: list[dict]) -> str:
    """The scripted teacher, whose new instructions carry an image the source lacks (adds_markup)."""
    image = "![logo](http://127.0.0.1:9/a.png)"
    return scripted_reply(messages).replace("[New Instruction] ", f"[New Instruction] {image} ")


def test_lazy_mode_reflects_a_where_a_rejected_q_leaves_the_a_branch(tmp_path, student_model_dir, monkeypatch):
    """With every Q rejected by a quality flag the selection takes the A branch for every sample, also
    where IFD(Q) > IFD(ori): lazy mode reflects that A too, and decides as eager mode does."""
    from dagster import DagsterInstance

    monkeypatch.setenv("SRT_TEST_TEACHER_KEY", KEY)
    decisions, answers = {}, {}
    with ScriptedOpenAIServer(api_key=KEY, reply=markup_in_new_instructions) as server:
        for mode in ("eager", "lazy"):
            (tmp_path / mode).mkdir()
            defs = pipeline(tmp_path / mode, server, student_model_dir, mode=mode)
            with DagsterInstance.ephemeral(tempdir=str(tmp_path / mode / "home")) as instance:
                assert materialize(defs, "s", instance, upto="sample_decisions", run_config=LOOSE).success
            store = tmp_path / mode / "store"
            decisions[mode] = pl.read_parquet(store / "sample_decisions" / "s.parquet").sort("sample_id")
            answers[mode] = pl.read_parquet(store / "better_responses" / "s.parquet")
    questions = pl.read_parquet(tmp_path / "lazy" / "store" / "new_instructions" / "s.parquet")
    rejected = set(questions.filter(pl.col("rejecting_flags").list.contains("adds_markup"))["sample_id"])
    assert len(rejected) == 3  # every parsed rewrite (the fourth row fails parsing and keeps its text)
    scores = pl.read_parquet(tmp_path / "lazy" / "store" / "student_scores" / "s.parquet")
    ifd = scores.pivot(on="variant", index="sample_id", values="ifd")
    harder = set(ifd.filter(pl.col("Q") > pl.col("ori"))["sample_id"]) & rejected
    assert harder  # the case the old lazy rule got wrong: it reflected only QA for these
    reflected_a = set(answers["lazy"].filter(pl.col("variant") == "A")["sample_id"])
    assert rejected <= reflected_a
    columns = ["sample_id", "branch", "chosen_variant", "selected"]
    assert decisions["lazy"].select(columns).equals(decisions["eager"].select(columns))


def test_new_instructions_is_a_module_level_asset_a_test_can_call(tmp_path, monkeypatch):
    """The stage's asset runs on a context built in the test, against the real local endpoint: one Q
    candidate per raw row and its blocking checks, with no Definitions or instance."""
    from dagster import AssetCheckResult, Output, build_asset_context

    from srt_assets.core.raw import load_source
    from srt_assets.defs.partitions import SOURCES
    from srt_assets.defs.teacher.assets import ReflectionConfig, new_instructions
    from srt_assets.resources import ComputeResource, SourceCatalogResource, StorageResource

    name = SOURCES.get_partition_keys()[0]  # a partition of the catalog the code location loaded
    write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(5, with_input=1))
    sources = SourceCatalogResource(sources_file=str(write_catalog(tmp_path, {name: {"path": "rows.jsonl"}})))
    raw, _ = load_source(sources.source(name))
    monkeypatch.setenv("SRT_TEST_TEACHER_KEY", KEY)
    with ScriptedOpenAIServer(api_key=KEY) as server:
        teacher = OpenAIChatResource(model="scripted", base_url=server.base_url, api_key_env="SRT_TEST_TEACHER_KEY")
        context = build_asset_context(partition_key=name)
        storage = StorageResource(base_dir=str(tmp_path / "store"))
        events = list(
            new_instructions(context, ReflectionConfig(), raw.lazy(), teacher, ComputeResource(), storage, sources)
        )
        assert server.requests == raw.height
        # the rows go a block at a time; blocks of 2 (and a fresh cache) give the same table
        monkeypatch.setattr("srt_assets.defs.teacher.assets.REFLECTION_BLOCK_ROWS", 2)
        fresh = StorageResource(base_dir=str(tmp_path / "store2"))
        blocked = list(
            new_instructions(context, ReflectionConfig(), raw.lazy(), teacher, ComputeResource(), fresh, sources)
        )
        assert server.requests == 2 * raw.height > 2
    # the candidates are written a block at a time (a row group each) to a staged file, which the IO
    # manager moves into place; no table is held whole
    [output] = [e for e in events if isinstance(e, Output)]
    table = output.value.scan().collect()
    blocked_output = next(e for e in blocked if isinstance(e, Output)).value
    assert blocked_output.scan().collect().equals(table)
    assert pq.ParquetFile(blocked_output.path).metadata.num_row_groups == math.ceil(raw.height / 2)
    assert table["sample_id"].to_list() == raw["sample_id"].to_list()
    assert set(table["variant"]) == {"Q"} and set(table["status"]) == {"ok"}
    assert output.metadata["calls_made"].value == raw.height
    assert {e.check_name: e.passed for e in events if isinstance(e, AssetCheckResult)} == {
        "failure_ratio_below_bound": True,
        "one_candidate_per_input": True,
    }

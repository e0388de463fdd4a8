"""The judge protocol on scripted replies (first-line parsing, both-order verdicts, the winning
score), the held-out prompt sets, and the report rendering."""

from __future__ import annotations

import math

import polars as pl
import pytest

from srt_assets.core.evaluation import PromptSetError, load_prompt_set
from srt_assets.core.judging import JudgePrompt, judge_pair, pairwise_summary, parse_judge_scores, summarize


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
        ("7, 7\nBoth fine.", (7.0, 7.0)),
        ("  9.5 3\n", (9.5, 3.0)),
        ("Assistant 1: 8, Assistant 2: 5\nreasons", None),  # four numbers on the first line
        ("I prefer the first one.\n8 6", None),  # the scores must be on the first line
        ("11 3", None),  # outside 1-10
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_scores(reply, expected):
    assert parse_judge_scores(reply) == expected


@pytest.mark.parametrize(
    ("model_first", "model_second", "verdict"),
    [
        ((8, 6), (6, 8), "win"),  # better in both orders
        ((8, 6), (7, 7), "win"),  # better in one, tied in the other
        ((7, 7), (7, 7), "tie"),  # tied in both
        ((8, 6), (8, 6), "tie"),  # position bias: first answer always wins → one win, one loss
        ((6, 8), (7, 7), "lose"),
        ((5, 8), (9, 4), "lose"),
        (None, (6, 8), None),  # a missing order leaves the prompt unjudged
    ],
)
def test_both_order_verdicts(model_first, model_second, verdict):
    assert judge_pair(model_first, model_second) == verdict


def test_winning_score_and_summary():
    summary = summarize(["win", "win", "tie", "lose", None])
    assert summary == {"win": 2, "tie": 1, "lose": 1, "judged": 4, "unjudged": 1, "winning_score": 1.25}
    assert math.isnan(summarize([None])["winning_score"])
    table = pl.DataFrame(
        {
            "model": ["selected"] * 3,
            "opponent": ["full"] * 3,
            "prompt_set": ["vicuna", "vicuna", "koala"],
            "verdict": ["win", "unjudged", "lose"],
        }
    )
    rows = {r["prompt_set"]: r for r in pairwise_summary(table).iter_rows(named=True)}
    assert rows["all"]["judged"] == 2 and rows["all"]["winning_score"] == 1.0
    assert rows["vicuna"]["win"] == 1 and rows["koala"]["lose"] == 1


def test_judge_prompt_shows_both_answers_in_order():
    messages = JudgePrompt().messages("Q?", "first answer", "second answer")
    user = messages[-1]["content"]
    assert user.index("first answer") < user.index("second answer") and "Q?" in user
    assert messages[0]["role"] == "system"


def test_prompt_sets_load_and_fail_clearly(shared_data, tmp_path):
    for name, expected in [("vicuna", 80), ("koala", 180), ("wizardlm", 218), ("lima", 300), ("sinstruct", 252)]:
        table = load_prompt_set(shared_data, name)
        assert table.height == expected and table["prompt"].str.len_chars().min() > 0, name
    sample = load_prompt_set(shared_data, "vicuna", count=5, seed=3)
    assert sample.height == 5 and sample.equals(load_prompt_set(shared_data, "vicuna", count=5, seed=3))
    reference = load_prompt_set(shared_data, "alpaca_eval", count=4)
    assert reference["reference"].is_not_null().all()
    with pytest.raises(PromptSetError, match=str(tmp_path)):
        load_prompt_set(tmp_path, "vicuna")
    with pytest.raises(PromptSetError, match="unknown prompt set"):
        load_prompt_set(shared_data, "nope")


def test_report_renders_tables_and_figures(tmp_path):
    from srt_assets.defs.evaluation.pairwise import pairwise_sections
    from srt_assets.defs.evaluation.reference_losses import training_sections
    from srt_assets.report import write_report

    judgements = pl.DataFrame(
        {
            "model": ["selected", "selected", "selected", "selected"],
            "opponent": ["full", "full", "random", "random"],
            "prompt_set": ["vicuna", "koala", "vicuna", "koala"],
            "verdict": ["win", "tie", "lose", "unjudged"],
        }
    )
    losses = pl.DataFrame(
        {
            "dataset": ["selected", "random", "full"],
            "prompt_set": ["alpaca_eval"] * 3,
            "prompt_id": ["0"] * 3,
            "loss": [1.5, 1.6, 1.4],
            "base_loss": [1.7] * 3,
            "tokens": [10] * 3,
        }
    )
    manifests = {
        "selected": {"rows": 2, "final_loss": 1.2, "training": {"steps": 2, "seconds": 1.0, "losses": [1.5, 1.2]}},
        "random": None,  # not trained yet: the report still renders
        "full": {"rows": 4, "final_loss": 1.1, "training": {"steps": 3, "seconds": 2.0, "losses": [1.6, 1.3, 1.1]}},
    }
    report = write_report(
        "demo", [*pairwise_sections(judgements), *training_sections(losses, manifests)], tmp_path / "out"
    )
    markdown = report.markdown_path.read_text()
    assert "| selected | full | all | 1 | 1 | 0 | 2 | 0 | 1.5 |" in markdown
    assert "![Training curves](training_curves.png)" in markdown
    for figure in ("verdicts.png", "reference_loss.png", "training_curves.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in report.html_path.read_text() and "data:image/png;base64," in report.inline_markdown
    training = {r["dataset"]: r for r in report.results["training"]}
    assert set(training) == {"selected", "random", "full", "base"}  # the base student's loss for scale
    assert training["selected"]["loss_alpaca_eval"] == 1.5 and training["base"]["loss_alpaca_eval"] == 1.7


def test_all_unjudged_report_says_why_the_chart_is_missing(tmp_path):
    from srt_assets.defs.evaluation.pairwise import pairwise_sections
    from srt_assets.defs.evaluation.reference_losses import training_sections
    from srt_assets.report import write_report

    judgements = pl.DataFrame(
        {"model": ["selected"] * 2, "opponent": ["full"] * 2, "prompt_set": ["vicuna", "koala"],
         "verdict": ["unjudged", "unjudged"]}
    )  # fmt: skip
    losses = pl.DataFrame(
        {"dataset": ["selected"], "prompt_set": ["alpaca_eval"], "prompt_id": ["0"], "loss": [float("nan")],
         "base_loss": [1.0], "tokens": [0]}
    )  # fmt: skip
    report = write_report(
        "demo", [*pairwise_sections(judgements), *training_sections(losses, {"selected": None})], tmp_path / "out"
    )
    markdown = report.markdown_path.read_text()
    assert "No verdict chart: all 2 comparisons are unjudged" in markdown
    assert "No verdict chart" in report.html_path.read_text()
    assert not (tmp_path / "out" / "verdicts.png").exists()


def test_bundled_eval_samples_load_in_a_bare_clone():
    """data/eval ships a few prompts of every set, so a clone evaluates with nothing beside it."""
    from srt_assets.core.evaluation import PROMPT_SETS
    from srt_assets.paths import BUNDLED_EVAL_DIR

    for name in PROMPT_SETS:
        table = load_prompt_set(BUNDLED_EVAL_DIR, name)
        assert table.height >= 8 and table["prompt"].str.len_chars().min() > 0, name
    assert load_prompt_set(BUNDLED_EVAL_DIR, "alpaca_eval")["reference"].is_not_null().all()


def test_bundled_eval_samples_are_the_first_records_of_the_full_sets(shared_data):
    from srt_assets.core.evaluation import PROMPT_SETS
    from srt_assets.paths import BUNDLED_EVAL_DIR

    for name in PROMPT_SETS:
        bundled = load_prompt_set(BUNDLED_EVAL_DIR, name)
        assert load_prompt_set(shared_data, name).head(bundled.height).equals(bundled), name


@pytest.mark.integration
def test_a_report_over_some_of_the_metrics_shows_them_and_names_the_rest(tmp_path, dagster_instance):
    """A source whose leaderboards were never run still gets its report through a real Dagster run:
    the student's diagnosis is rendered, and every other part names the assets to materialize."""
    from conftest import latest_metadata, materialize
    from dagster import AssetKey

    from srt_assets.definitions import build_definitions

    store = tmp_path / "store"
    (store / "student_diagnosis").mkdir(parents=True)
    diagnosis = {"probe": ["swapped"], "statistic": ["ifd"], "auc": [0.875], "ci_low": [0.8], "ci_high": [0.9],
                 "pairs": [64]}  # fmt: skip
    pl.DataFrame(diagnosis).write_parquet(store / "student_diagnosis" / "demo.parquet")
    defs = build_definitions(storage_dir=store)
    result = materialize(defs, "demo", dagster_instance, selection=[AssetKey("experiment_report")])
    assert result.success
    metadata = latest_metadata(dagster_instance, "experiment_report")
    assert "student_diagnosis" not in metadata["not_materialized"]
    assert {"- alpacaeval_results", "- mt_bench_scores", "- pairwise_verdicts"} <= set(
        metadata["not_materialized"].splitlines()
    )
    markdown = (store / "reports" / "demo" / "report.md").read_text()
    assert "| swapped | ifd | 0.875 |" in markdown
    assert "Not in this report yet: materialize alpacaeval_results for source 'demo'" in markdown
    assert "Not in this report yet: materialize new_instructions, better_responses for source 'demo'" in markdown
    assert metadata["report_link"] == (store / "reports" / "demo" / "report.html").resolve().as_uri()
    assert list(metadata)[-2:] == ["report_markdown", "report_html"]  # paths last


def test_every_table_a_report_part_reads_is_an_asset_of_the_graph():
    """A part naming a table no stage makes would read an external asset that never exists."""
    from srt_assets.definitions import defs
    from srt_assets.defs.evaluation.report import REPORT_PARTS

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    reads = {name for part in REPORT_PARTS for name in part.reads}
    assert reads and reads <= keys
    assert {"student_diagnosis", "alpacaeval_results", "mt_bench_scores", "reference_loss"} <= reads


def test_missing_note_reads_right_when_empty():
    """The report's not_materialized metadata is a sentence, not "[]", when nothing is missing."""
    from srt_assets.defs.evaluation.report import missing_note

    assert missing_note([]) == "Every input of the report is materialized."
    assert missing_note(["b", "a"]).splitlines()[-2:] == ["- b", "- a"]

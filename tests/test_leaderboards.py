"""AlpacaEval, MT-Bench and the authors' pairwise protocol, each driven by a judge on 127.0.0.1
whose preference is known, through the real judge resource (OpenAI client, call cache) and the
real alpaca-eval package: the rates they compute must be the known truth."""

import re
import socket
from pathlib import Path

import polars as pl
import pytest
from dagster import build_asset_context
from openai_server import ScriptedOpenAIServer, last_user_message

from srt_assets import paths
from srt_assets.core.generation import GenerationParams
from srt_assets.core.judging import pairwise_summary
from srt_assets.core.mt_bench import grade, load_judge_templates, load_questions, parse_rating, score_summary
from srt_assets.core.templates import get_template, render_conversation
from srt_assets.core.winrates import draw_instructions, load_reference, win_rate
from srt_assets.defs.evaluation.pairwise import ANSWER_SCHEMA, JudgeConfig, judge_pairs
from srt_assets.resources import ComputeResource, OpenAIChatResource, StorageResource

NO_VERDICT = "NO-VERDICT"  # an answer carrying this gets a judge reply that says nothing parseable
RANKED = re.compile(r'"answer": """(.*?)"""', re.S)


def longer_wins_ranking(messages: list[dict]) -> str:
    """alpaca_eval_gpt4's judge that always ranks the longer answer first."""
    first, second = RANKED.findall(last_user_message(messages))
    if NO_VERDICT in first + second:
        return "Both answers have merits; I cannot choose."
    best = 1 if len(first) > len(second) else 2
    return f"[{{'model': 'model_1', 'rank': {best}}}, {{'model': 'model_2', 'rank': {3 - best}}}]"


def judge_session(server: ScriptedOpenAIServer, tmp_path: Path, max_tokens: int = 64):
    judge = OpenAIChatResource(model="known-judge", base_url=server.base_url, max_retries=0)
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens)
    return judge.session(ComputeResource(), StorageResource(base_dir=str(tmp_path / "storage"))), params


def reference_records(count: int = 6) -> list[dict]:
    return draw_instructions(load_reference(paths.BUNDLED_EVAL_DIR, "text_davinci_003"), count, seed=0)


def run_win_rate(server, tmp_path, outputs, reference, name="run", **kwargs):
    session, params = judge_session(server, tmp_path)
    with session as cached:
        return win_rate(
            outputs,
            reference,
            lambda conversations: cached.generate(conversations, params),
            "alpaca_eval_gpt4",
            tmp_path / name,
            **kwargs,
        )


@pytest.mark.parametrize(
    ("change", "expected_rate", "wins", "losses", "draws"),
    [
        (lambda text: text + " And here is one more detail.", 100.0, 6, 0, 0),  # always the longer
        (lambda text: text[: len(text) // 2], 0.0, 0, 6, 0),  # always the shorter
        (lambda text: text, 50.0, 0, 0, 6),  # the same answers: ties, no judge call at all
    ],
    ids=["always-preferred", "never-preferred", "identical"],
)
@pytest.mark.integration
def test_alpaca_eval_win_rate_is_the_judges_known_preference(tmp_path, change, expected_rate, wins, losses, draws):
    reference = reference_records()
    outputs = [dict(r, output=change(r["output"]), generator="srt-test") for r in reference]
    with ScriptedOpenAIServer(reply=longer_wins_ranking) as server:
        metrics, annotations, ledger = run_win_rate(server, tmp_path, outputs, reference)
        requests = server.requests
    assert metrics["win_rate"] == pytest.approx(expected_rate)
    assert metrics["discrete_win_rate"] == pytest.approx(expected_rate)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"]) == (wins, losses, draws)
    assert metrics["n_total"] == 6 and metrics["unjudged"] == 0
    assert requests == ledger.calls == (0 if draws else 6)  # alpaca_eval swaps the order; the judge sees content
    assert annotations.height == 6 and set(annotations["preference"]) <= {1.0, 2.0, 0.0, 1.5}
    assert (tmp_path / "run" / "annotations.json").is_file() and (tmp_path / "run" / "leaderboard.csv").is_file()


@pytest.mark.integration
def test_unparseable_alpaca_eval_replies_are_counted_and_never_guessed_and_reruns_hit_the_cache(tmp_path):
    reference = reference_records()
    outputs = [dict(r, output=r["output"] + " More detail.", generator="srt-test") for r in reference]
    for row in outputs[:2]:
        row["output"] += f" {NO_VERDICT}"
    with ScriptedOpenAIServer(reply=longer_wins_ranking) as server:
        metrics, _, _ = run_win_rate(server, tmp_path, outputs, reference)
        first_requests = server.requests
        again, _, ledger = run_win_rate(server, tmp_path, outputs, reference, name="rerun")
        assert server.requests == first_requests  # the judged pairs come from the call cache
    assert metrics["unjudged"] == 2 and metrics["n_total"] == 4
    assert metrics["win_rate"] == pytest.approx(100.0)  # over the judged pairs only: no 50/50 guess for the others
    assert again == metrics and ledger.calls == 6  # the unparseable replies are cached too, and stay unjudged


@pytest.mark.integration
def test_when_no_reply_parses_every_pair_is_unjudged_and_there_is_no_rate(tmp_path):
    reference = reference_records(3)
    outputs = [dict(r, output=f"{r['output']} {NO_VERDICT}", generator="srt-test") for r in reference]
    with ScriptedOpenAIServer(reply=longer_wins_ranking) as server:
        metrics, annotations, ledger = run_win_rate(server, tmp_path, outputs, reference)
    assert ledger.calls == 3 and metrics["unjudged"] == 3 and metrics["n_total"] == 0
    assert metrics["win_rate"] is None and metrics["discrete_win_rate"] is None
    assert annotations["preference"].is_null().all()


@pytest.mark.integration
def test_alpaca_eval_runs_offline_without_a_single_hub_request(tmp_path, monkeypatch):
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            attempts.append(host)
            raise OSError(f"test: no network ({host})")
        return real_connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(host)
            raise OSError(f"test: no DNS ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    reference = reference_records(4)
    outputs = [dict(r, output=r["output"] + " Extra.", generator="srt-test") for r in reference]
    with ScriptedOpenAIServer(reply=longer_wins_ranking) as server:
        metrics, _, _ = run_win_rate(server, tmp_path, outputs, reference, length_controlled=True)
    assert attempts == []
    assert metrics["win_rate"] == pytest.approx(100.0)
    assert metrics["length_controlled_winrate"] is None  # defined on the full 805 set only


GRADED = {
    1: re.compile(r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S),
    2: re.compile(r"### Assistant A:\n(.*?)\n\n<\|The End of Assistant A's Conversation", re.S),
}


def rating_by_content(messages: list[dict]) -> str:
    """MT-Bench judge: 9 for an answer that says GOOD, 2 for BAD, no rating for NO-VERDICT."""
    user = last_user_message(messages)
    match = GRADED[1].search(user) or GRADED[2].search(user)
    answer = match.group(1)
    if NO_VERDICT in answer:
        return "The answer is interesting."
    return f"The answer is {'fine' if 'GOOD' in answer else 'weak'}. Rating: [[{9 if 'GOOD' in answer else 2}]]"


@pytest.mark.integration
def test_mt_bench_scores_are_the_judges_known_ratings(tmp_path):
    questions = load_questions(paths.BUNDLED_EVAL_DIR)
    picked = pl.concat([questions.filter(pl.col("category") == c).head(1) for c in ("writing", "math")])
    answers = pl.DataFrame(
        [
            {"checkpoint": name, "question_id": q, "answer_1": f"{word} first answer to {q}",
             "answer_2": f"{word} second answer to {q}"}
            for name, word in (("selected", "GOOD"), ("random", "BAD"))
            for q in picked["question_id"]
        ]
    )  # fmt: skip
    answers = answers.with_columns(
        pl.when((pl.col("checkpoint") == "random") & (pl.col("question_id") == picked["question_id"][1]))
        .then(pl.lit(f"BAD second answer {NO_VERDICT}"))
        .otherwise(pl.col("answer_2"))
        .alias("answer_2")
    )
    with ScriptedOpenAIServer(reply=rating_by_content) as server:
        session, params = judge_session(server, tmp_path, max_tokens=128)
        with session as cached:
            scores = grade(
                answers, questions, load_judge_templates(paths.BUNDLED_EVAL_DIR), lambda c: cached.generate(c, params)
            )
        prompts = [last_user_message(p["messages"]) for p in server.payloads]
    assert scores.height == 8 and server.requests == 8
    assert scores.filter(pl.col("model") == "selected")["score"].to_list() == [9.0] * 4
    assert scores.filter(pl.col("model") == "random")["score"].to_list() == [2.0, 2.0, 2.0, None]
    summary = score_summary(scores).filter(pl.col("category") == "all")
    both = {r["model"]: r for r in summary.filter(pl.col("turn") == "both").iter_rows(named=True)}
    assert both["selected"]["mean_score"] == 9.0 and both["selected"]["unjudged"] == 0
    assert both["random"]["mean_score"] == 2.0 and (both["random"]["judged"], both["random"]["unjudged"]) == (3, 1)
    # the protocol: turn 2 is graded with the whole conversation, math with GPT-4's reference answer
    math = picked.filter(pl.col("category") == "math").row(0, named=True)
    assert any(math["reference_1"] in p and "GOOD first answer" not in p for p in prompts)
    assert any("GOOD first answer" in p and "GOOD second answer" in p and math["reference_2"] in p for p in prompts)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("Rating: [[7]]", 7.0), ("[[8.5]] overall", 8.5), ("Score [6]", 6.0), ("[[11]]", None), ("no score", None)],
)
def test_mt_bench_rating_parser(reply, expected):
    assert parse_rating(reply) == expected


PAIR = re.compile(r"\[Answer of Assistant (\d)\]\n(.*?)\n\[End of Answer of Assistant \1\]", re.S)


def longer_scores_higher(messages: list[dict]) -> str:
    """The authors' protocol judge: the longer answer gets 9, the shorter 3, equal lengths 5 each."""
    (_, first), (_, second) = PAIR.findall(last_user_message(messages))
    if NO_VERDICT in first + second:
        return "Both are fine."
    if len(first) == len(second):
        return "5 5\nAs good as each other."
    return "9 3\nThe first is fuller." if len(first) > len(second) else "3 9\nThe second is fuller."


@pytest.mark.parametrize(
    ("selected_answer", "verdict", "winning_score"),
    [("a long and detailed answer", "win", 2.0), ("ok", "lose", 0.0), ("same", "tie", 1.0)],
)
@pytest.mark.integration
def test_pairwise_protocol_gives_the_judges_known_verdicts(tmp_path, selected_answer, verdict, winning_score):
    prompts = [("vicuna", "1"), ("vicuna", "2"), ("koala", "k1"), ("koala", "k2")]
    rows = [
        {"dataset": dataset, "prompt_set": s, "prompt_id": i, "prompt": f"question {i}",
         "answer": selected_answer if dataset == "selected" else "same", "answer_tokens": 1, "cache_key": ""}
        for dataset in ("selected", "random")
        for s, i in prompts
    ]  # fmt: skip
    rows[3]["answer"] += f" {NO_VERDICT}"  # selected's answer to k2 gets no parseable verdict
    answers = pl.DataFrame(rows, schema=ANSWER_SCHEMA)
    storage = StorageResource(base_dir=str(tmp_path / "storage"))
    with ScriptedOpenAIServer(reply=longer_scores_higher) as server:
        judge = OpenAIChatResource(model="known-judge", base_url=server.base_url, max_retries=0)
        table, _ = judge_pairs(
            build_asset_context(),
            answers,
            JudgeConfig(pairs=[["selected", "random"]]),
            judge,
            ComputeResource(),
            storage,
        )
    assert table.filter(pl.col("prompt_id") != "k2")["verdict"].to_list() == [verdict] * 3
    assert table.filter(pl.col("prompt_id") == "k2")["verdict"].to_list() == ["unjudged"]
    overall = pairwise_summary(table).filter(pl.col("prompt_set") == "all").row(0, named=True)
    assert (overall["judged"], overall["unjudged"]) == (3, 1)
    assert overall["winning_score"] == winning_score


@pytest.mark.integration
def test_pairwise_verdicts_is_a_module_level_asset_a_test_can_call(tmp_path):
    """The stage's asset runs on a context built in the test, with a judge at a local endpoint: its
    verdict table, its summary and its blocking check, with no Definitions or instance."""
    from dagster import AssetCheckResult, Output

    from srt_assets.defs.evaluation.pairwise import pairwise_verdicts
    from srt_assets.defs.partitions import SOURCES

    rows = [
        {"dataset": dataset, "prompt_set": "vicuna", "prompt_id": str(i), "prompt": f"question {i}",
         "answer": "a long and detailed answer" if dataset == "selected" else "short", "answer_tokens": 1,
         "cache_key": ""}
        for dataset in ("selected", "random") for i in range(2)
    ]  # fmt: skip
    storage = StorageResource(base_dir=str(tmp_path / "storage"))
    with ScriptedOpenAIServer(reply=longer_scores_higher) as server:
        judge = OpenAIChatResource(model="known-judge", base_url=server.base_url, max_retries=0)
        context = build_asset_context(partition_key=SOURCES.get_partition_keys()[0])
        config = JudgeConfig(pairs=[["selected", "random"]])
        answers = pl.DataFrame(rows, schema=ANSWER_SCHEMA)
        events = list(pairwise_verdicts(context, config, answers, judge, ComputeResource(), storage))
        assert server.requests == 4  # 2 prompts x both answer orders
    [output] = [e for e in events if isinstance(e, Output)]
    assert output.value["verdict"].to_list() == ["win", "win"]
    assert [(e.check_name, e.passed) for e in events if isinstance(e, AssetCheckResult)] == [
        ("verdict_per_prompt_and_pair", True)
    ]


def test_a_second_turn_is_rendered_after_the_first_in_the_training_template():
    template = get_template("alpaca")
    conversation = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    text = render_conversation(template.render, conversation)
    assert text == f"{template.render('Q1')} A1\n\n{template.render('Q2')}"
    assert render_conversation(template.render, conversation[1:2]) == template.render("Q1")


def test_report_puts_checkpoints_side_by_side_and_says_why_all_is_unjudged():
    from srt_assets.core.winrates import RESULT_SCHEMA
    from srt_assets.defs.evaluation.leaderboards import alpaca_eval_section, mt_bench_section

    def result(checkpoint, reference, rate, judged, unjudged):
        empty = dict.fromkeys(RESULT_SCHEMA)
        return empty | {"checkpoint": checkpoint, "reference": reference, "win_rate": rate, "standard_error": 0.0,
                        "n_total": judged, "unjudged": unjudged, "instructions": 4, "judge_calls": 4}  # fmt: skip

    rows = [result("full", "text_davinci_003", None, 0, 4), result("selected", "text_davinci_003", 75.0, 4, 0)]
    section = alpaca_eval_section(pl.DataFrame(rows, schema=RESULT_SCHEMA))
    assert section.table.columns[:3] == ["reference", "selected", "full"]  # checkpoint order, not row order
    assert section.table.row(0, named=True) == {
        "reference": "text_davinci_003", "selected": "75.0 ± 0.0 (4 judged)", "full": "unjudged",
        "judged": 4, "unjudged": 4, "judge_calls": 8,
    }  # fmt: skip
    assert "4 of 8 pairs are unjudged" in section.note
    silent = [result(c, "text_davinci_003", None, 0, 4) for c in ("selected", "random", "full")]
    assert "Every pair is unjudged" in alpaca_eval_section(pl.DataFrame(silent, schema=RESULT_SCHEMA)).note
    scores = pl.DataFrame(
        {"model": ["selected", "random"], "question_id": [81, 81], "category": ["writing"] * 2, "turn": [1, 1],
         "score": [None, None], "judge_reply": ["hm", "hm"], "judge_status": ["ok", "ok"], "cache_key": ["a", "b"]},
        schema_overrides={"score": pl.Float64},
    )  # fmt: skip
    mt = mt_bench_section(scores)
    assert "Every answer is unjudged" in mt.note and mt.table["selected"].to_list() == ["unjudged"] * 2
    assert "bundled 135M" in mt.note
    cut = mt_bench_section(scores.with_columns(pl.Series("judge_status", ["truncated", "failed"])))
    assert "1 judge calls failed" in cut.note and "1 judge replies ran out of tokens" in cut.note
    assert "bundled 135M" not in cut.note  # a failing endpoint is not blamed on the model


@pytest.mark.integration
def test_a_judge_that_answers_401_makes_failed_calls_not_a_format_complaint(tmp_path):
    reference = reference_records(3)
    outputs = [dict(r, output=r["output"] + " More.", generator="srt-test") for r in reference]
    with ScriptedOpenAIServer(reply=longer_wins_ranking, api_key="right-key") as server:
        judge = OpenAIChatResource(model="known-judge", base_url=server.base_url, max_retries=0)  # no key
        params = GenerationParams(temperature=0.0, max_tokens=64)
        with judge.session(ComputeResource(), StorageResource(base_dir=str(tmp_path / "s"))) as cached:
            metrics, _, ledger = win_rate(
                outputs, reference, lambda c: cached.generate(c, params), "alpaca_eval_gpt4", tmp_path / "w"
            )
    assert metrics["unjudged"] == 3 and ledger.failed == 3 and metrics["win_rate"] is None


@pytest.mark.integration
def test_repeated_instructions_pair_row_by_row_not_as_a_cross_product(tmp_path):
    reference = reference_records(4)
    reference = [*reference, dict(reference[0], output=reference[0]["output"] + " (second copy)")]
    outputs = [dict(r, output=r["output"] + " Plus more.", generator="srt-test") for r in reference]
    with ScriptedOpenAIServer(reply=longer_wins_ranking) as server:
        metrics, _, ledger = run_win_rate(server, tmp_path, outputs, reference)
    assert (metrics["n_total"], metrics["unjudged"], ledger.calls) == (5, 0, 5)
    assert metrics["win_rate"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="1 outputs have no reference"):
        run_win_rate(server, tmp_path, [*outputs, dict(outputs[1], instruction="unknown")], reference, name="x")


@pytest.mark.parametrize("annotator", ["weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4_fn", "alpaca_farm"])
def test_annotators_that_need_more_than_text_are_refused_with_a_reason(tmp_path, annotator):
    from srt_assets.core.winrates import annotator_folder

    with pytest.raises(ValueError, match=r"log-probabilities or a tool call|several annotators"):
        annotator_folder(annotator, tmp_path)


def test_length_controlled_rate_without_the_hub_is_null_with_a_reason(monkeypatch):
    import alpaca_eval.metrics

    from srt_assets.core.winrates import FULL_SET, length_controlled_rate

    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(alpaca_eval.metrics, "get_length_controlled_winrate", offline)
    assert length_controlled_rate([], FULL_SET) == (None, "length-controlled: alpaca_eval could not compute it "
                                                    "(OSError: hub unreachable)")  # fmt: skip
    rate, note = length_controlled_rate([], 24)
    assert rate is None and "full 805 set" in note


@pytest.mark.parametrize(
    ("file", "line", "broken", "message"),
    [
        (
            "mt_bench_question.jsonl",
            3,
            {"question_id": 83, "category": "writing", "turns": "ab"},
            "'turns' must be list",
        ),
        (
            "mt_bench_question.jsonl",
            2,
            {"question_id": 82, "category": "writing", "turns": [None, "x"]},
            "two non-empty",
        ),
        ("mt_bench_question.jsonl", 1, {"category": "writing", "turns": ["a", "b"]}, "'question_id' must be int"),
        ("mt_bench_reference_answer_gpt-4.jsonl", 1, {"question_id": 101}, "'choices' must be list, found missing"),
        ("mt_bench_judge_prompts.jsonl", 5, {"type": "single"}, "'name' must be str"),
    ],
)
def test_broken_mt_bench_files_name_the_file_line_and_field(tmp_path, file, line, broken, message):
    import json
    import shutil

    from srt_assets.core.mt_bench import MTBenchError

    for name in ("mt_bench_question.jsonl", "mt_bench_reference_answer_gpt-4.jsonl", "mt_bench_judge_prompts.jsonl"):
        shutil.copy(paths.BUNDLED_EVAL_DIR / name, tmp_path / name)
    lines = (tmp_path / file).read_text().splitlines()
    lines[line - 1] = json.dumps(broken)
    (tmp_path / file).write_text("\n".join(lines) + "\n")
    load = load_judge_templates if "judge" in file else load_questions
    with pytest.raises(MTBenchError, match=re.escape(f"{tmp_path / file}: line {line}: ") + ".*" + re.escape(message)):
        load(tmp_path)


def test_missing_judge_prompt_is_named_when_the_file_is_read(tmp_path):
    from srt_assets.core.mt_bench import MTBenchError

    kept = [x for x in (paths.BUNDLED_EVAL_DIR / "mt_bench_judge_prompts.jsonl").read_text().splitlines()
            if '"single-math-v1-multi-turn"' not in x]  # fmt: skip
    (tmp_path / "mt_bench_judge_prompts.jsonl").write_text("\n".join(kept))
    with pytest.raises(MTBenchError, match="single-math-v1-multi-turn missing"):
        load_judge_templates(tmp_path)


def test_reference_files_with_a_bom_load_and_broken_ones_name_file_record_and_field(tmp_path):
    import json

    from srt_assets.core.winrates import REFERENCES, AlpacaEvalError

    path = tmp_path / REFERENCES["text_davinci_003"]
    records = load_reference(paths.BUNDLED_EVAL_DIR, "text_davinci_003")
    path.write_text(json.dumps(records), encoding="utf-8-sig")
    assert load_reference(tmp_path, "text_davinci_003") == records
    path.write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(AlpacaEvalError, match=re.escape(f"{path}: expected a JSON array of records, found a dict")):
        load_reference(tmp_path, "text_davinci_003")
    path.write_text(json.dumps([records[0], {k: v for k, v in records[1].items() if k != "output"}]))
    with pytest.raises(AlpacaEvalError, match=re.escape(f"{path}: record 1: field 'output' missing or not text")):
        load_reference(tmp_path, "text_davinci_003")
    with pytest.raises(AlpacaEvalError, match=r"file not found: .*SRT_EVAL_DATA_DIR"):
        load_reference(tmp_path, "gpt4_1106_preview")

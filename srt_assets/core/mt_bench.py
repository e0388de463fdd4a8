"""MT-Bench single-answer grading (Zheng et al., 2023) on the published FastChat files: the 80
two-turn questions, the GPT-4 reference answers and the judge prompt templates (Apache-2.0).

FastChat's own grader is tied to the pre-1.0 ``openai`` client, so this module carries over its
protocol, not its code: turn 1 is graded with ``single-v1`` (``single-math-v1`` with the reference
answer for math, reasoning and coding), turn 2 with the ``-multi-turn`` variants that show the
whole conversation; the judge writes ``[[rating]]`` on a 1–10 scale. A reply without a readable
rating is ``None``, counted as unjudged and never given a score.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from srt_assets.core.generation import Generation, Messages

QUESTION_FILE = "mt_bench_question.jsonl"
REFERENCE_FILE = "mt_bench_reference_answer_gpt-4.jsonl"
JUDGE_PROMPT_FILE = "mt_bench_judge_prompts.jsonl"
NEEDS_REFERENCE = frozenset({"math", "reasoning", "coding"})
TURNS = (1, 2)
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))

QUESTION_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.Int64(),
    "category": pl.String(),
    "turn_1": pl.String(),
    "turn_2": pl.String(),
    "reference_1": pl.String(),  # the GPT-4 reference answers, where the category needs one
    "reference_2": pl.String(),
}


class MTBenchError(ValueError):
    pass


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    system_prompt: str
    prompt_template: str


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a JSON Lines file; errors name the file and the line."""
    if not path.is_file():
        raise MTBenchError(
            f"MT-Bench file not found: {path}. Set the evaluation data folder ($SRT_EVAL_DATA_DIR) "
            "to a folder holding it (the repository ships it in data/eval)."
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MTBenchError(f"{path}: line {number} is not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise MTBenchError(f"{path}: line {number}: expected an object, found a {type(record).__name__}")
            records.append((number, record))
    return records


def _field(record: dict, name: str, kind: type, path: Path, line: int):
    value = record.get(name)
    if kind is int and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        found = "missing" if name not in record else f"a {type(value).__name__}"
        raise MTBenchError(f"{path}: line {line}: field '{name}' must be {kind.__name__}, found {found}")
    return value


def _two_texts(value: list, name: str, path: Path, line: int) -> list[str]:
    if len(value) != 2 or not all(isinstance(t, str) and t.strip() for t in value):
        raise MTBenchError(f"{path}: line {line}: field '{name}' must hold two non-empty texts")
    return value


def load_questions(data_dir: Path, count: int | None = None, seed: int = 0) -> pl.DataFrame:
    """The questions with their reference answers; ``count`` drawn with ``seed`` (a plain seeded
    sample kept in file order), all when None."""
    reference_path, question_path = Path(data_dir) / REFERENCE_FILE, Path(data_dir) / QUESTION_FILE
    references = {}
    for line, record in _jsonl(reference_path):
        choices = _field(record, "choices", list, reference_path, line)
        if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("turns"), list):
            raise MTBenchError(f"{reference_path}: line {line}: field 'choices' must hold an object with 'turns'")
        turns = choices[0]["turns"]
        references[_field(record, "question_id", int, reference_path, line)] = [*turns, None, None][:2]
    rows = []
    for line, record in _jsonl(question_path):
        qid = _field(record, "question_id", int, question_path, line)
        category = _field(record, "category", str, question_path, line)
        turns = _two_texts(_field(record, "turns", list, question_path, line), "turns", question_path, line)
        reference = references.get(qid, [None, None]) if category in NEEDS_REFERENCE else [None, None]
        if category in NEEDS_REFERENCE and not isinstance(reference[0], str):
            raise MTBenchError(
                f"{question_path}: line {line}: question {qid} ({category}) needs a reference answer; "
                f"{reference_path} has none"
            )
        rows.append({"question_id": qid, "category": category, "turn_1": turns[0], "turn_2": turns[1],
                     "reference_1": reference[0], "reference_2": reference[1]})  # fmt: skip
    frame = pl.DataFrame(rows, schema=QUESTION_SCHEMA)
    if count is not None and count < frame.height:
        frame = frame.with_row_index("_i").sample(n=count, seed=seed).sort("_i").drop("_i")
    return frame


def load_judge_templates(data_dir: Path) -> dict[str, JudgeTemplate]:
    """FastChat's judge prompts by name; the four that single-answer grading uses must be there."""
    path = Path(data_dir) / JUDGE_PROMPT_FILE
    templates = {}
    for line, record in _jsonl(path):
        name = _field(record, "name", str, path, line)
        fields = (_field(record, f, str, path, line) for f in ("system_prompt", "prompt_template"))
        templates[name] = JudgeTemplate(name, *fields)
    needed = [template_name(c, t) for c in ("writing", "math") for t in TURNS]
    missing = [n for n in needed if n not in templates]
    if missing:
        raise MTBenchError(f"{path}: judge prompt(s) {', '.join(missing)} missing (single-answer grading needs them)")
    return templates


def template_name(category: str, turn: int) -> str:
    base = "single-math-v1" if category in NEEDS_REFERENCE else "single-v1"
    return f"{base}-multi-turn" if turn == 2 else base


def judge_messages(
    templates: dict[str, JudgeTemplate], question: dict, answers: tuple[str, str], turn: int
) -> Messages:
    """The judge conversation that grades ``turn`` of one model's two answers to ``question``."""
    template = templates[template_name(question["category"], turn)]
    fields = {
        "question": question["turn_1"],
        "answer": answers[0],
        "question_1": question["turn_1"],
        "question_2": question["turn_2"],
        "answer_1": answers[0],
        "answer_2": answers[1],
        "ref_answer_1": question["reference_1"] or "",
        "ref_answer_2": question["reference_2"] or "",
    }
    return [
        {"role": "system", "content": template.system_prompt},
        {"role": "user", "content": template.prompt_template.format_map(fields)},
    ]


def parse_rating(text: str | None) -> float | None:
    """The ``[[rating]]`` of a judge reply (``[rating]`` as FastChat's fallback), 1–10; else None."""
    for pattern in _RATING:
        match = pattern.search(text or "")
        if match:
            rating = float(match.group(1))
            return rating if 1 <= rating <= 10 else None
    return None


SCORE_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String(),
    "question_id": pl.Int64(),
    "category": pl.String(),
    "turn": pl.Int64(),
    "score": pl.Float64(),  # 1–10; null where the judge wrote no readable [[rating]] (unjudged)
    "judge_reply": pl.String(),
    "judge_status": pl.String(),  # ok | failed (the call failed for good) | truncated (cut at max_tokens)
    "cache_key": pl.String(),
}


def grade(answers: pl.DataFrame, questions: pl.DataFrame, templates: dict[str, JudgeTemplate], judge) -> pl.DataFrame:
    """Both turns of every answer row (``checkpoint``, ``question_id``, ``answer_1``, ``answer_2``)
    graded in one batch by ``judge`` (conversations → ``[(cache key, Generation)]``)."""
    by_id = {q["question_id"]: q for q in questions.iter_rows(named=True)}
    jobs, conversations = [], []
    for row in answers.iter_rows(named=True):
        if row["question_id"] not in by_id:
            raise MTBenchError(f"MT-Bench question {row['question_id']} is not in {QUESTION_FILE}")
        for turn in TURNS:
            jobs.append((row, turn))
            pair = (row["answer_1"], row["answer_2"])
            conversations.append(judge_messages(templates, by_id[row["question_id"]], pair, turn))
    replies = judge(conversations)
    rows = []
    for (row, turn), (key, reply) in zip(jobs, replies, strict=True):
        category = by_id[row["question_id"]]["category"]
        rows.append(
            {"model": row["checkpoint"], "question_id": row["question_id"], "category": category, "turn": turn,
             "score": parse_rating(reply.text), "judge_reply": reply.text, "judge_status": judge_status(reply),
             "cache_key": key}
        )  # fmt: skip
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def judge_status(reply: Generation) -> str:
    if not reply.usable:
        return "failed"
    return "truncated" if reply.finish_reason == "length" else "ok"


def score_summary(scores: pl.DataFrame) -> pl.DataFrame:
    """Mean score per model and turn (and both turns together), per category and over all
    categories, over the graded answers; ``unjudged`` counts the replies without a rating."""
    graded = scores.with_columns(pl.col("score").is_null().alias("_unjudged"))
    frames = []
    for by_category in (False, True):
        keys = ["model", "category"] if by_category else ["model"]
        for turn in ("1", "2", "both"):
            part = graded if turn == "both" else graded.filter(pl.col("turn") == int(turn))
            summary = part.group_by(keys).agg(
                pl.col("score").mean().alias("mean_score"),
                (~pl.col("_unjudged")).sum().alias("judged"),
                pl.col("_unjudged").sum().alias("unjudged"),
            )
            if not by_category:
                summary = summary.with_columns(pl.lit("all").alias("category"))
            frames.append(summary.with_columns(pl.lit(turn).alias("turn")))
    return (
        pl.concat([f.select("model", "category", "turn", "mean_score", "judged", "unjudged") for f in frames])
        .with_columns(pl.col("judged").cast(pl.Int64), pl.col("unjudged").cast(pl.Int64))
        .sort("model", pl.col("category") != "all", "category", "turn")
    )

"""Pairwise judging of two models' answers (docs/method.md, "Judge protocol").

The judge scores both answers 1–10 on the first line of its reply; every pair is judged in both
orders to cancel position bias; a win is "better in both orders, or better in one and tied in the
other", a tie "tied in both, or one win and one loss"; the winning score is (wins − losses)/N + 1.
The prompt wording is ours; a user can load another (e.g. the authors') from a file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import polars as pl

from srt_assets.core.generation import Messages

JUDGE_SYSTEM = "You are a careful, impartial assistant who rates the quality of answers to a question."
JUDGE_USER = (
    "[Question]\n{question}\n\n"
    "[Answer of Assistant 1]\n{answer_1}\n[End of Answer of Assistant 1]\n\n"
    "[Answer of Assistant 2]\n{answer_2}\n[End of Answer of Assistant 2]\n\n"
    "[Task]\nRate how helpful, relevant, accurate and detailed each answer is, on a scale from 1 to 10 "
    "(higher is better). On the first line write only the two ratings, Assistant 1's first, separated by "
    "a space. From the second line on, explain your ratings briefly and without favouring either position."
)
JUDGE_JSON_SCHEMA = {  # strict-mode compatible: every property required, no others
    "title": "pairwise_judgement",
    "type": "object",
    "properties": {"score_1": {"type": "integer"}, "score_2": {"type": "integer"}, "explanation": {"type": "string"}},
    "required": ["score_1", "score_2", "explanation"],
    "additionalProperties": False,
}
OUTCOMES = ("win", "tie", "lose")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class JudgePrompt:
    system: str = JUDGE_SYSTEM
    user: str = JUDGE_USER

    def messages(self, question: str, answer_1: str, answer_2: str) -> Messages:
        user = self.user.format_map({"question": question, "answer_1": answer_1, "answer_2": answer_2})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def parse_judge_scores(text: str | None) -> tuple[float, float] | None:
    """The two ratings from the first line of a judge reply (commas allowed as separators), or None
    when that line does not hold exactly two numbers within 0–10."""
    if not text:
        return None
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    numbers = _NUMBER.findall(first_line.replace(",", " "))
    if len(numbers) != 2:
        return None
    scores = float(numbers[0]), float(numbers[1])
    if not all(0 <= s <= 10 for s in scores):
        return None
    return scores


def parse_judge_reply(text: str | None, structured: bool) -> tuple[float, float] | None:
    """The two ratings of a judge reply: the first line of a free-text reply, or the ``score_1`` and
    ``score_2`` fields of a structured (JSON) one."""
    if not structured:
        return parse_judge_scores(text)
    try:
        data = json.loads(text or "")
        return float(data["score_1"]), float(data["score_2"])
    except (ValueError, KeyError, TypeError):
        return None


def order_outcome(score_model: float, score_other: float) -> int:
    """+1 if the model's answer was rated higher, 0 if tied, −1 if lower."""
    return (score_model > score_other) - (score_model < score_other)


def combine_orders(first: int, second: int) -> str:
    """Both-order verdict from the per-order outcomes (model's view)."""
    total = first + second
    if total > 0:
        return "win"  # better in both, or better in one and tied in the other
    if total == 0:
        return "tie"  # tied in both, or one win and one loss
    return "lose"


def judge_pair(
    scores_model_first: tuple[float, float] | None, scores_model_second: tuple[float, float] | None
) -> str | None:
    """Verdict for one prompt, from the judge's scores with the model's answer shown first
    (scores = (model, other)) and shown second (scores = (other, model)); None if either is missing."""
    if scores_model_first is None or scores_model_second is None:
        return None
    first = order_outcome(scores_model_first[0], scores_model_first[1])
    second = order_outcome(scores_model_second[1], scores_model_second[0])
    return combine_orders(first, second)


def summarize(verdicts: list[str | None]) -> dict[str, float | int]:
    """Win/tie/lose counts over the prompts that were judged in both orders, and the winning score."""
    counts = Counter(v for v in verdicts if v is not None)
    judged = sum(counts.values())
    wins, ties, losses = (counts.get(o, 0) for o in OUTCOMES)
    return {
        "win": wins,
        "tie": ties,
        "lose": losses,
        "judged": judged,
        "unjudged": len(verdicts) - judged,
        "winning_score": round((wins - losses) / judged + 1, 4) if judged else float("nan"),
    }


def pairwise_summary(table: pl.DataFrame) -> pl.DataFrame:
    """Win/tie/lose and winning score per pair and test set, plus an 'all' row per pair."""
    rows = []
    for (model, opponent), pair in table.group_by("model", "opponent", maintain_order=True):
        groups = [("all", pair), *sorted(pair.group_by("prompt_set"), key=lambda g: g[0][0])]
        for name, part in groups:
            set_name = name if isinstance(name, str) else name[0]
            verdicts = [None if v == "unjudged" else v for v in part["verdict"]]
            rows.append({"model": model, "opponent": opponent, "prompt_set": set_name, **summarize(verdicts)})
    return pl.DataFrame(rows)

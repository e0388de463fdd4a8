"""Held-out prompt sets (the test sets of the Cherry/Reflection-Tuning evaluation) and the
reference answers of the judge-free metric, read into one schema."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from srt_assets.core.datasets import BASE
from srt_assets.core.quality import CheckOutcome

PROMPT_SCHEMA: dict[str, pl.DataType] = {
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "reference": pl.String(),  # a reference answer where the set has one (AlpacaEval), else null
}


def _sinstruct(record: dict) -> str:
    instances = record.get("instances") or [{}]
    extra = instances[0].get("input") or ""
    return f"{record['instruction']}\n{extra}".strip() if extra else record["instruction"]


@dataclass(frozen=True)
class PromptSetSpec:
    file: str
    prompt: Callable[[dict], str]
    identifier: Callable[[dict, int], str]
    reference: Callable[[dict], str | None] = lambda record: None


PROMPT_SETS: dict[str, PromptSetSpec] = {
    "vicuna": PromptSetSpec(
        "cherry_llm_vicuna_test_set.jsonl", lambda r: r["text"], lambda r, i: str(r["question_id"])
    ),
    "koala": PromptSetSpec("cherry_llm_koala_test_set.jsonl", lambda r: r["prompt"], lambda r, i: r["id"]),
    "wizardlm": PromptSetSpec(
        "cherry_llm_wizardlm_test_set.jsonl", lambda r: r["Instruction"], lambda r, i: str(r["idx"])
    ),
    "lima": PromptSetSpec("cherry_llm_lima_test_set.jsonl", lambda r: r["conversations"], lambda r, i: str(i)),
    "sinstruct": PromptSetSpec("cherry_llm_sinstruct_test_set.jsonl", _sinstruct, lambda r, i: r["id"]),
    # AlpacaEval's 805 prompts with two references each: text-davinci-003's answers (Alpaca's own style)
    # and GPT-4-turbo's (gpt4_1106_preview, a GPT-4 family reference); same prompts, same ids.
    "alpaca_eval": PromptSetSpec(
        "alpaca_eval_text_davinci_003_reference_outputs.json",
        lambda r: r["instruction"],
        lambda r, i: str(i),
        lambda r: r["output"],
    ),
    "alpaca_eval_gpt4": PromptSetSpec(
        "alpaca_eval_gpt4_1106_preview_reference_outputs.json",
        lambda r: r["instruction"],
        lambda r, i: str(i),
        lambda r: r["output"],
    ),
}
REFERENCE_SETS = ("alpaca_eval", "alpaca_eval_gpt4")


class PromptSetError(ValueError):
    pass


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_prompt_set(data_dir: Path, name: str, count: int | None = None, seed: int = 0) -> pl.DataFrame:
    """``count`` prompts of set ``name`` (all when None), drawn with ``seed`` and kept in file order."""
    if name not in PROMPT_SETS:
        raise PromptSetError(f"unknown prompt set '{name}'; choose from {', '.join(PROMPT_SETS)}")
    spec = PROMPT_SETS[name]
    path = Path(data_dir) / spec.file
    if not path.is_file():
        raise PromptSetError(
            f"prompt set '{name}': file not found: {path}. Set the evaluation data folder "
            "(EvaluationPromptsConfig.data_dir or $SRT_EVAL_DATA_DIR) to the folder holding it."
        )
    try:
        records = _records(path)
        rows = [
            {
                "prompt_set": name,
                "prompt_id": spec.identifier(r, i),
                "prompt": spec.prompt(r),
                "reference": spec.reference(r),
            }
            for i, r in enumerate(records)
        ]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise PromptSetError(f"prompt set '{name}': cannot read {path}: {exc!r}") from exc
    frame = pl.DataFrame(rows, schema=PROMPT_SCHEMA).filter(pl.col("prompt").str.strip_chars() != "")
    if count is not None and count < frame.height:
        frame = frame.with_row_index("_i").sample(n=count, seed=seed).sort("_i").drop("_i")
    return frame


@dataclass(frozen=True)
class LossDifference:
    """Selected minus one baseline on one reference set: the mean paired difference of per-answer losses
    with its bootstrap interval (negative: the selected-data model fits the references better)."""

    reference_set: str
    baseline: str
    pairs: int
    selected: float
    other: float
    difference: float
    low: float
    high: float

    def words(self) -> str:
        if self.pairs < 2:
            return f"{self.reference_set}: {self.pairs} scorable pair(s), no interval"
        return f"{self.reference_set}: {self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}] over {self.pairs}"


def paired_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean of a − b over the pairs where both are finite, with a bootstrap confidence interval
    (resampling prompts, so the pairing is kept; scipy's BCa). NaN bounds below two pairs."""
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(diffs.mean())
    if diffs.size < 2:
        return mean, math.nan, math.nan, 1
    if np.all(diffs == diffs[0]):  # no spread: the interval is the point (BCa cannot be computed)
        return mean, mean, mean, int(diffs.size)
    result = stats.bootstrap(
        (diffs,), np.mean, confidence_level=confidence, n_resamples=resamples, rng=np.random.default_rng(seed)
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high), int(diffs.size)


# The baselines the selected-data model is compared with: checkpoint name (or "base") → words.
LOSS_BASELINES = {
    "random": "the random-sample model",
    "teacher": "the model tuned on every teacher rewrite",
    "full": "the model tuned on all original rows",
    BASE: "the base student",
}


def loss_differences(losses: pl.DataFrame, baselines: Sequence[str] = tuple(LOSS_BASELINES)) -> list[LossDifference]:
    """Selected minus each baseline, per reference set, paired by prompt. ``losses`` has dataset,
    prompt_set, prompt_id, loss and base_loss (the base student's loss on the same answer)."""
    found = []
    base = losses.select("prompt_set", "prompt_id", pl.col("base_loss").alias(BASE)).unique(
        ["prompt_set", "prompt_id"], keep="first", maintain_order=True
    )
    wide = losses.pivot(on="dataset", index=["prompt_set", "prompt_id"], values="loss", aggregate_function="first")
    wide = wide.join(base, on=["prompt_set", "prompt_id"], how="left")
    for reference_set in sorted(wide["prompt_set"].unique()) if "selected" in wide.columns else []:
        part = wide.filter(pl.col("prompt_set") == reference_set)
        for baseline in (b for b in baselines if b in part.columns):
            selected, other = part["selected"].to_numpy(), part[baseline].to_numpy()
            mean, low, high, pairs = paired_interval(selected, other)
            both = np.isfinite(selected) & np.isfinite(other)
            means = (float(selected[both].mean()), float(other[both].mean())) if pairs else (math.nan, math.nan)
            found.append(LossDifference(reference_set, baseline, pairs, *means, mean, low, high))
    return found


def loss_comparisons(differences: Sequence[LossDifference]) -> list[CheckOutcome]:
    """The judge-free result checks, one per baseline: the selected-data model passes only where the
    whole confidence interval of its difference lies below zero on every reference set (a single mean
    below the baseline's is not enough); otherwise the check warns with the intervals."""
    outcomes = []
    for baseline, label in LOSS_BASELINES.items():
        mine = [d for d in differences if d.baseline == baseline]
        better = bool(mine) and all(d.pairs >= 2 and d.high < 0 for d in mine)
        words = "; ".join(d.words() for d in mine) or "no finite reference losses to compare"
        outcomes.append(
            CheckOutcome(
                f"selected_beats_{baseline}",
                better,
                f"selected − {label}, mean reference loss with a 95% paired bootstrap interval: {words}",
                {d.reference_set: {"difference": round(d.difference, 6), "low": round(d.low, 6),
                                   "high": round(d.high, 6), "pairs": d.pairs} for d in mine},
            )
        )  # fmt: skip
    return outcomes

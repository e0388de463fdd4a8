"""Held-out prompt sets (the test sets of the Cherry/Reflection-Tuning evaluation) and the
reference answers of the judge-free metric, read into one schema."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

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
    "alpaca_eval": PromptSetSpec(
        "alpaca_eval_text_davinci_003_reference_outputs.json",
        lambda r: r["instruction"],
        lambda r, i: str(i),
        lambda r: r["output"],
    ),
}


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


def loss_comparisons(mean_loss: dict[str, float]) -> list[CheckOutcome]:
    """The judge-free result checks: does the model tuned on selected data reach a lower mean loss
    on reference answers than the random-sample model, and than the base student? A missing mean
    (no scorable reference) fails the comparison and says so."""
    outcomes = []
    for name, other, label in (
        ("selected_beats_random", "random", "the random-sample model"),
        ("selected_beats_base", "base", "the base student"),
    ):
        selected, baseline = mean_loss.get("selected", math.nan), mean_loss.get(other, math.nan)
        known = math.isfinite(selected) and math.isfinite(baseline)
        outcomes.append(
            CheckOutcome(
                name,
                known and selected < baseline,
                f"mean reference loss of the selected-data model {selected:.4f} vs {label} {baseline:.4f}"
                if known
                else f"no finite mean reference loss to compare with {label}",
                {"selected": selected if known else None, other: baseline if known else None,
                 "difference": round(selected - baseline, 6) if known else None},
            )
        )  # fmt: skip
    return outcomes

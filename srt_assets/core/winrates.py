"""AlpacaEval win rates, computed by the ``alpaca-eval`` package itself, offline.

alpaca_eval brings the annotator (its prompt template and reply parser, its random order swap) and
the metrics (win rate, standard error, discrete win rate). We bring three things it would otherwise
fetch or own: the reference outputs from local files, no precomputed leaderboard, and the completion
function, which routes every judge prompt through our judge session (the call cache, retries,
failure accounting; any backend: an OpenAI-compatible endpoint, vLLM, a local model). Nothing
here asks a hub for anything; the length-controlled win rate, whose GLM needs
``tatsu-lab/alpaca_eval``'s hub files, is computed only on request and only on the full set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from srt_assets.core.files import atomic_write_text
from srt_assets.core.generation import Generation, Messages

FULL_SET = 805
REFERENCES: dict[str, str] = {  # reference model → its outputs file
    "text_davinci_003": "alpaca_eval_text_davinci_003_reference_outputs.json",  # AlpacaEval 1.0
    "gpt4_1106_preview": "alpaca_eval_gpt4_1106_preview_reference_outputs.json",  # the 2.0 reference
}
LENGTH_CONTROLLED_REFERENCE = "gpt4_1106_preview"  # the baseline alpaca_eval's length-control GLM was fitted for
MODEL_OUTPUT_FIELDS = ("instruction", "output", "generator", "dataset")
RESULT_SCHEMA: dict[str, pl.DataType] = {
    "checkpoint": pl.String(),
    "reference": pl.String(),
    "annotator": pl.String(),
    "win_rate": pl.Float64(),
    "standard_error": pl.Float64(),
    "discrete_win_rate": pl.Float64(),
    "length_controlled_winrate": pl.Float64(),
    "n_wins": pl.Int64(),
    "n_wins_base": pl.Int64(),
    "n_draws": pl.Int64(),
    "n_total": pl.Int64(),  # pairs with a preference (alpaca_eval's count)
    "unjudged": pl.Int64(),  # pairs whose judge reply had no readable preference: left out, never guessed
    "instructions": pl.Int64(),
    "judge_calls": pl.Int64(),  # judge replies (new calls and call-cache hits)
    "judge_calls_made": pl.Int64(),  # of them, calls made in this run
    "judge_failed": pl.Int64(),  # calls that failed for good: their pairs are unjudged
    "judge_truncated": pl.Int64(),  # replies cut off at max_tokens
    "judge_prompt_tokens": pl.Int64(),
    "judge_completion_tokens": pl.Int64(),
    "note": pl.String(),
}
Judge = Callable[[list[Messages]], list[tuple[str, Generation]]]
NEEDS_MORE_THAN_TEXT = frozenset({"logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call"})


class AlpacaEvalError(ValueError):
    pass


def load_reference(data_dir: Path, reference: str) -> list[dict]:
    """One reference model's outputs on the AlpacaEval instructions, from a local file."""
    if reference not in REFERENCES:
        raise AlpacaEvalError(f"unknown AlpacaEval reference '{reference}'; choose from {', '.join(REFERENCES)}")
    path = Path(data_dir) / REFERENCES[reference]
    if not path.is_file():
        raise AlpacaEvalError(
            f"AlpacaEval reference '{reference}': file not found: {path}. Set $SRT_EVAL_DATA_DIR to a folder "
            "holding it (e.g. ../shared/data); the repository ships the first 24 records in data/eval."
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlpacaEvalError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(records, list):
        raise AlpacaEvalError(f"{path}: expected a JSON array of records, found a {type(records).__name__}")
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise AlpacaEvalError(f"{path}: record {number}: expected an object, found a {type(record).__name__}")
        missing = [f for f in MODEL_OUTPUT_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise AlpacaEvalError(f"{path}: record {number}: field '{missing[0]}' missing or not text")
    return records


def draw_instructions(records: Sequence[dict], count: int | None, seed: int) -> list[dict]:
    """``count`` records drawn with ``seed``, kept in file order (all when None or more than there are)."""
    frame = pl.DataFrame(list(records)).with_row_index("_i")
    if count is not None and count < frame.height:
        frame = frame.sample(n=count, seed=seed).sort("_i")
    return frame.drop("_i").to_dicts()


@dataclass
class JudgeLedger:
    """What the judge did for one alpaca_eval run: its replies, failures and tokens."""

    calls: int = 0  # replies, whether new or from the call cache
    failed: int = 0  # calls that failed for good (the reply is empty, so the pair is unjudged)
    truncated: int = 0  # replies cut off at max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0


def completion_function(judge: Judge, ledger: JudgeLedger) -> Callable[..., dict]:
    """alpaca_eval's ``fn_completions`` contract over our judge: ChatML prompt texts in, reply texts
    out (an empty text where the call failed, which alpaca_eval's parser leaves unannotated)."""
    prompt_to_chatml = _import_quietly("alpaca_eval.utils").prompt_to_chatml

    def complete(prompts: Sequence[str], **_decoding) -> dict[str, list]:
        conversations = [prompt_to_chatml(p) for p in prompts]
        replies = judge(conversations)
        ledger.calls += len(replies)
        ledger.failed += sum(not g.usable for _, g in replies)
        ledger.truncated += sum(g.finish_reason == "length" for _, g in replies)
        ledger.prompt_tokens += sum(g.prompt_tokens for _, g in replies)
        ledger.completion_tokens += sum(g.completion_tokens for _, g in replies)
        return {
            "completions": [g.text or "" for _, g in replies],
            "price_per_example": [0.0] * len(replies),
            "time_per_example": [0.0] * len(replies),
        }

    return complete


def annotator_folder(annotator: str, work_dir: Path) -> Path:
    """A copy of alpaca_eval's configuration of ``annotator`` whose completion function is left
    open (we pass ours) and whose prompt template is alpaca_eval's own file, by absolute path."""
    constants = _import_quietly("alpaca_eval.constants")

    source = Path(constants.EVALUATORS_CONFIG_DIR) / annotator / "configs.yaml"
    if not source.is_file():
        raise AlpacaEvalError(f"alpaca_eval has no annotator '{annotator}' ({source} not found)")
    configured = yaml.safe_load(source.read_text())
    if list(configured) != [annotator]:
        raise AlpacaEvalError(
            f"alpaca_eval's '{annotator}' configures several annotators ({', '.join(configured)}); "
            "choose a single-annotator config such as alpaca_eval_gpt4"
        )
    settings = configured[annotator]
    needs = set(settings.get("completions_kwargs", {})) & NEEDS_MORE_THAN_TEXT
    if needs or settings.get("completion_key", "completions") != "completions":
        raise AlpacaEvalError(
            f"annotator '{annotator}' needs {', '.join(sorted(needs)) or 'the raw API reply'} from the judge "
            "(log-probabilities or a tool call); the judge resource returns text. Choose a text-parsing "
            "annotator such as alpaca_eval_gpt4 (AlpacaEval 1.0's judge)."
        )
    settings = {k: v for k, v in settings.items() if k not in ("fn_completions", "completions_kwargs")}
    template = Path(settings["prompt_template"])
    settings["prompt_template"] = str(template if template.is_absolute() else source.parent.parent / template)
    folder = Path(work_dir) / annotator
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "configs.yaml", yaml.safe_dump({annotator: settings}, sort_keys=False))
    return folder


def win_rate(
    model_outputs: list[dict],
    reference_outputs: list[dict],
    judge: Judge,
    annotator: str,
    work_dir: Path,
    length_controlled: bool = False,
) -> tuple[dict, pl.DataFrame, JudgeLedger]:
    """alpaca_eval's head-to-head of ``model_outputs`` against ``reference_outputs`` (same
    instructions), judged through ``judge``. Writes alpaca_eval's leaderboard.csv and
    annotations.json into ``work_dir``; returns its metrics (plus ``unjudged``), the annotations
    and the judge's ledger."""
    alpaca_eval_main = _import_quietly("alpaca_eval.main")
    reference_outputs = aligned(model_outputs, reference_outputs)
    ledger = JudgeLedger()
    work_dir = Path(work_dir)
    folder = annotator_folder(annotator, work_dir)
    root = logging.getLogger()
    root.addFilter(_unjudged_chatter)
    try:
        leaderboard, annotations = alpaca_eval_main.evaluate(
            model_outputs=model_outputs,
            reference_outputs=reference_outputs,
            # pair row i with row i: a repeated instruction is not a cross product
            annotation_kwargs={"is_ordered": True},
            annotators_config=str(folder / "configs.yaml"),
            output_path=str(work_dir),
            precomputed_leaderboard=None,
            is_cache_leaderboard=False,
            is_return_instead_of_print=True,
            fn_metric=judged_winrate,
            sort_by="win_rate",
            caching_path=None,
            fn_completions=completion_function(judge, ledger),
        )
    finally:
        root.removeFilter(_unjudged_chatter)
    row = leaderboard.iloc[0].to_dict()
    metrics = {k: _number(row.get(k)) for k in ("win_rate", "standard_error", "discrete_win_rate",
                                                 "n_wins", "n_wins_base", "n_draws", "n_total")}  # fmt: skip
    judged = sum(_number(a.get("preference")) is not None for a in annotations)
    if judged > len(model_outputs):
        raise AlpacaEvalError(f"alpaca_eval returned {judged} judged pairs for {len(model_outputs)} outputs")
    metrics["instructions"] = len(model_outputs)
    metrics["unjudged"] = len(model_outputs) - judged
    metrics["length_controlled_winrate"], metrics["note"] = None, None
    if length_controlled:
        metrics["length_controlled_winrate"], metrics["note"] = length_controlled_rate(annotations, len(model_outputs))
    table = pl.DataFrame(
        [{"instruction": a["instruction"], "preference": _number(a.get("preference")),
          "judge_reply": a.get("preference_raw_completion")} for a in annotations],
        schema={"instruction": pl.String(), "preference": pl.Float64(), "judge_reply": pl.String()},
    )  # fmt: skip
    return metrics, table, ledger


def judged_winrate(annotations) -> dict:
    """alpaca_eval's ``get_winrate`` over the pairs that have a preference; when none has (every
    reply unparseable), no rate at all, where alpaca_eval itself would fail on an empty series."""
    get_winrate = _import_quietly("alpaca_eval.metrics").get_winrate

    judged = [a for a in annotations if _number(a.get("preference")) is not None]
    if not judged:
        empty = dict.fromkeys(("win_rate", "standard_error", "discrete_win_rate"))
        return empty | {"n_wins": 0, "n_wins_base": 0, "n_draws": 0, "n_total": 0}
    return get_winrate(judged)


def _unjudged_chatter(record: logging.LogRecord) -> bool:
    """Drop alpaca_eval's per-reply parse errors (each with the whole reply) and its 'no auto
    annotation' warning: srt counts those pairs as unjudged and reports them once."""
    path = Path(record.pathname)
    if path.parent.name != "alpaca_eval" and path.parent.parent.name != "alpaca_eval":
        return True
    message = record.getMessage()
    return not (
        path.name == "completion_parsers.py"
        or "no auto annotation" in message
        or message.startswith("Error while parsing completion")
    )


def _import_quietly(module: str):
    """Import an alpaca_eval module without its side effect on logging: it sets the root logger
    to INFO at import, which would flood every log of the process with its chatter."""
    import importlib

    root = logging.getLogger()
    level = root.level
    try:
        return importlib.import_module(module)
    finally:
        root.setLevel(level)


def aligned(model_outputs: list[dict], reference_outputs: list[dict]) -> list[dict]:
    """The reference records in the order of ``model_outputs``, one per output (a repeated
    instruction takes its copies in file order); an error names what does not match."""
    by_instruction: dict[str, list[dict]] = {}
    for record in reference_outputs:
        by_instruction.setdefault(record["instruction"], []).append(record)
    ordered, missing = [], []
    for record in model_outputs:
        copies = by_instruction.get(record["instruction"])
        if copies:
            ordered.append(copies.pop(0))
        else:
            missing.append(record["instruction"])
    extra = [r["instruction"] for copies in by_instruction.values() for r in copies]
    if missing or extra:
        shown = "; ".join(repr(t[:60]) for t in (missing or extra)[:3])
        raise AlpacaEvalError(
            f"model and reference outputs must pair up by instruction: {len(missing)} outputs have no "
            f"reference and {len(extra)} references no output (e.g. {shown})"
        )
    return ordered


def length_controlled_rate(annotations, instructions: int) -> tuple[float | None, str | None]:
    """alpaca_eval's length-controlled win rate, or None and why. alpaca_eval defines it on the full
    805 set; its GLM reads instruction difficulties from the Hugging Face hub (network, or a filled
    HF cache), and was fitted for the 2.0 setting, so it means most against gpt4_1106_preview."""
    if instructions != FULL_SET:
        return None, f"length-controlled: defined on the full {FULL_SET} set, this run has {instructions}"
    get_length_controlled_winrate = _import_quietly("alpaca_eval.metrics").get_length_controlled_winrate

    try:
        rate = get_length_controlled_winrate(annotations, save_weights_dir=None)["length_controlled_winrate"]
    except Exception as exc:  # the hub unreachable, or the GLM failing on degenerate preferences
        return None, f"length-controlled: alpaca_eval could not compute it ({type(exc).__name__}: {str(exc)[:120]})"
    return _number(rate), None


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

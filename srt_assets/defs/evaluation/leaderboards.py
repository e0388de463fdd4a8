"""The field's benchmarks next to the authors' protocol: AlpacaEval win rates (computed by the
``alpaca-eval`` package, offline, judged by the judge resource) and MT-Bench single-answer grading.
Answers and judge calls go through the durable call cache, so a rerun only pays for what changed."""

import json
from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from srt_assets import paths
from srt_assets.core.datasets import BASE
from srt_assets.core.files import atomic_write_text
from srt_assets.core.generation import GenerationParams
from srt_assets.core.mt_bench import SCORE_SCHEMA, grade, load_judge_templates, load_questions, score_summary
from srt_assets.core.winrates import (
    LENGTH_CONTROLLED_REFERENCE,
    REFERENCES,
    RESULT_SCHEMA,
    draw_instructions,
    load_reference,
    win_rate,
)
from srt_assets.defs.common import calls_progress, column_schema, json_value, judge_metadata, table_value
from srt_assets.defs.evaluation.steps import JUDGE_STEP, Answer, answer_with_checkpoints, checkpoint_step
from srt_assets.defs.report_parts import ReportPart
from srt_assets.defs.training.assets import TRAINING_SETS
from srt_assets.plots import markdown_table
from srt_assets.report import Section
from srt_assets.resources import ChatModelResource, ComputeResource, StorageResource, StudentModelResource

OUTPUT_SCHEMA: dict[str, pl.DataType] = {  # alpaca_eval's model_outputs fields, then ours
    "instruction": pl.String(),
    "output": pl.String(),
    "generator": pl.String(),
    "dataset": pl.String(),  # AlpacaEval's subset (helpful_base, koala, oasst, selfinstruct, vicuna)
    "checkpoint": pl.String(),  # selected | random | full
    "answer_tokens": pl.Int64(),
    "cache_key": pl.String(),
}
MT_ANSWER_SCHEMA: dict[str, pl.DataType] = {
    "checkpoint": pl.String(),
    "question_id": pl.Int64(),
    "category": pl.String(),
    "answer_1": pl.String(),
    "answer_2": pl.String(),
    "answer_tokens": pl.Int64(),
    "cache_key_1": pl.String(),
    "cache_key_2": pl.String(),
}


class BenchmarkAnswerConfig(Config):
    """The benchmark files are read from $SRT_EVAL_DATA_DIR (else the samples in data/eval)."""

    count: int | None = Field(4, description="instructions/questions drawn (None: all; the published numbers use all)")
    seed: int = 0
    max_new_tokens: int = Field(96, description="greedy answer length per turn (CPU demo size; the paper: 1024)")
    batch_size: int = 8


class AlpacaEvalConfig(Config):
    references: list[str] = Field(
        default=list(REFERENCES), description="reference outputs: text_davinci_003 (1.0) and/or gpt4_1106_preview (2.0)"
    )
    annotator: str = Field("alpaca_eval_gpt4", description="alpaca_eval annotator config (a text-parsing one)")
    max_tokens: int = Field(64, description="judge reply length (the ranking list takes about 30 tokens)")
    length_controlled: bool = Field(
        False, description="also alpaca_eval's length-controlled win rate: full 805 set only, reads hub files"
    )


class MTBenchJudgeConfig(Config):
    max_tokens: int = Field(128, description="judge reply length (FastChat: 2048; the rating comes last)")


def export_model_outputs(table: pl.DataFrame, folder: Path) -> dict[str, str]:
    """Each checkpoint's answers as alpaca_eval's model_outputs.json, ready to submit anywhere."""
    written = {}
    for checkpoint in table["checkpoint"].unique(maintain_order=True):
        part = table.filter(pl.col("checkpoint") == checkpoint).select("instruction", "output", "generator", "dataset")
        path = folder / checkpoint / "model_outputs.json"
        atomic_write_text(path, json.dumps(part.to_dicts(), indent=2, ensure_ascii=False))
        written[checkpoint] = str(path)
    return written


def answers_output(
    table: pl.DataFrame, stats: dict, example_columns: tuple[str, ...], **figures: object
) -> Output[pl.DataFrame]:
    """A benchmark's answers with what every answering asset shows: its figures, the calls made and
    served from the cache per checkpoint, and a few answers to read."""
    examples = markdown_table(table.select(*example_columns).head(6))
    return Output(
        table,
        metadata={
            **{name: table_value(value) if isinstance(value, dict) else value for name, value in figures.items()},
            "calls": table_value(stats, "checkpoint"),
            "examples": MetadataValue.md(examples),
        },
    )


@asset(**checkpoint_step(), metadata={"dagster/column_schema": column_schema(OUTPUT_SCHEMA)})
def alpacaeval_outputs(
    context: AssetExecutionContext,
    config: BenchmarkAnswerConfig,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> Output[pl.DataFrame]:
    """Each checkpoint's answers to the AlpacaEval instructions (a seeded subset on CPU), in
    alpaca_eval's model_outputs format and exported as model_outputs.json per checkpoint."""
    source = context.partition_key
    reference = load_reference(paths.eval_data_dir(), "text_davinci_003")
    records = draw_instructions(reference, config.count, config.seed)
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in records]
    params = GenerationParams(temperature=0.0, max_tokens=config.max_new_tokens)
    answers, stats = answer_with_checkpoints(
        storage, source, student, gpu, config.batch_size, lambda answer: answer(conversations, params)
    )
    parts = [
        pl.DataFrame(
            {
                "instruction": [r["instruction"] for r in records],
                "output": [g.text or "" for _, g in replies],
                "generator": f"srt-{source}-{checkpoint}",
                "dataset": [r["dataset"] for r in records],
                "checkpoint": checkpoint,
                "answer_tokens": [g.completion_tokens for _, g in replies],
                "cache_key": [k for k, _ in replies],
            },
            schema=OUTPUT_SCHEMA,
        )
        for checkpoint, replies in answers.items()
    ]
    table = pl.concat(parts)
    exported = export_model_outputs(table, storage.exports_dir / "alpacaeval_outputs" / source)
    return answers_output(
        table, stats, ("checkpoint", "instruction", "output"), instructions=len(records), model_outputs_json=exported
    )


@asset(**JUDGE_STEP, metadata={"dagster/column_schema": column_schema(RESULT_SCHEMA)})
def alpacaeval_results(
    context: AssetExecutionContext,
    config: AlpacaEvalConfig,
    alpacaeval_outputs: pl.DataFrame,
    judge: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> Output[pl.DataFrame]:
    """Each checkpoint's AlpacaEval win rate against each reference, computed by alpaca_eval with
    the judge resource as its annotator's model. Pairs whose judge reply alpaca_eval cannot
    parse are counted as unjudged and left out of the rate."""
    source = context.partition_key
    data_dir = paths.eval_data_dir()
    instructions = set(alpacaeval_outputs["instruction"])
    params = GenerationParams(temperature=0.0, max_tokens=config.max_tokens)
    rows, files = [], {}
    with judge.session(gpu, storage, calls_progress(context, "judge")) as cached:
        for reference in config.references:
            reference_outputs = [r for r in load_reference(data_dir, reference) if r["instruction"] in instructions]
            for checkpoint in alpacaeval_outputs["checkpoint"].unique(maintain_order=True):
                outputs = alpacaeval_outputs.filter(pl.col("checkpoint") == checkpoint)
                work_dir = storage.reports_dir / source / "alpaca_eval" / reference / checkpoint
                made_before = cached.stats.calls
                metrics, _, ledger = win_rate(
                    outputs.select("instruction", "output", "generator", "dataset").to_dicts(),
                    reference_outputs,
                    lambda conversations: cached.generate(conversations, params),
                    config.annotator,
                    work_dir,
                    config.length_controlled and reference == LENGTH_CONTROLLED_REFERENCE,
                )
                files[f"{reference}/{checkpoint}"] = str(work_dir / "annotations.json")
                if config.length_controlled and reference != LENGTH_CONTROLLED_REFERENCE:
                    metrics["note"] = f"length-controlled: alpaca_eval defines it against {LENGTH_CONTROLLED_REFERENCE}"
                rows.append(
                    metrics
                    | {
                        "checkpoint": checkpoint,
                        "reference": reference,
                        "annotator": config.annotator,
                        "judge_calls": ledger.calls,
                        "judge_calls_made": cached.stats.calls - made_before,
                        "judge_failed": ledger.failed,
                        "judge_truncated": ledger.truncated,
                        "judge_prompt_tokens": ledger.prompt_tokens,
                        "judge_completion_tokens": ledger.completion_tokens,
                    }
                )
    table = pl.DataFrame(rows, schema=RESULT_SCHEMA)
    context.log.info(f"judge calls: {cached.stats.calls} made, {cached.stats.cache_hits} from cache")
    return Output(
        table,
        metadata={
            "results": MetadataValue.md(markdown_table(alpaca_eval_table(table), max_chars=40)),
            "unjudged": int(table["unjudged"].sum()),
            **judge_metadata(judge, cached.stats),
            "annotations_json": json_value(files),
        },
    )


@asset(**checkpoint_step(), metadata={"dagster/column_schema": column_schema(MT_ANSWER_SCHEMA)})
def mt_bench_answers(
    context: AssetExecutionContext,
    config: BenchmarkAnswerConfig,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> Output[pl.DataFrame]:
    """Each checkpoint's two-turn answers to the MT-Bench questions (a seeded subset on CPU): the
    second turn is asked with the first question and the checkpoint's own first answer before it."""
    source = context.partition_key
    questions = load_questions(paths.eval_data_dir(), config.count, config.seed)
    params = GenerationParams(temperature=0.0, max_tokens=config.max_new_tokens)
    first_turns = [[{"role": "user", "content": q}] for q in questions["turn_1"]]

    def both_turns(answer: Answer) -> tuple[list, list]:
        first = answer(first_turns, params)
        second_turns = [
            [*conversation, {"role": "assistant", "content": g.text or ""}, {"role": "user", "content": q}]
            for conversation, (_, g), q in zip(first_turns, first, questions["turn_2"], strict=True)
        ]
        return first, answer(second_turns, params)

    answers, stats = answer_with_checkpoints(storage, source, student, gpu, config.batch_size, both_turns)
    parts = [
        questions.select("question_id", "category").with_columns(
            pl.lit(checkpoint).alias("checkpoint"),
            pl.Series("answer_1", [g.text or "" for _, g in first], dtype=pl.String),
            pl.Series("answer_2", [g.text or "" for _, g in second], dtype=pl.String),
            pl.Series(
                "answer_tokens",
                [g.completion_tokens + h.completion_tokens for (_, g), (_, h) in zip(first, second, strict=True)],
                dtype=pl.Int64,
            ),
            pl.Series("cache_key_1", [k for k, _ in first], dtype=pl.String),
            pl.Series("cache_key_2", [k for k, _ in second], dtype=pl.String),
        )
        for checkpoint, (first, second) in answers.items()
    ]
    table = pl.concat(parts).select(*MT_ANSWER_SCHEMA)
    return answers_output(table, stats, ("checkpoint", "category", "answer_1"), questions=questions.height)


@asset(**JUDGE_STEP, metadata={"dagster/column_schema": column_schema(SCORE_SCHEMA)})
def mt_bench_scores(
    context: AssetExecutionContext,
    config: MTBenchJudgeConfig,
    mt_bench_answers: pl.DataFrame,
    judge: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> Output[pl.DataFrame]:
    """MT-Bench single-answer grading by the judge: 1–10 per turn, FastChat's prompts and GPT-4
    reference answers. A reply without a readable ``[[rating]]`` is unjudged, never scored."""
    data_dir = paths.eval_data_dir()
    params = GenerationParams(temperature=0.0, max_tokens=config.max_tokens)
    with judge.session(gpu, storage, calls_progress(context, "judge")) as cached:
        table = grade(
            mt_bench_answers,
            load_questions(data_dir),
            load_judge_templates(data_dir),
            lambda conversations: cached.generate(conversations, params),
        )
    summary = score_summary(table)
    return Output(
        table,
        metadata={
            "summary": MetadataValue.md(markdown_table(summary.filter(pl.col("category") == "all"))),
            "per_category": MetadataValue.md(markdown_table(summary, max_chars=40)),
            "unjudged": int(table["score"].is_null().sum()),
            **judge_metadata(judge, cached.stats),
        },
    )


def side_by_side(frame: pl.DataFrame, row: str, column: str, cell: pl.Expr) -> pl.DataFrame:
    """One row per ``row`` value, one column per checkpoint (selected, random, full, teacher, then the base
    student where the frame has it)."""
    cells = frame.select(row, column, cell.alias("cell"))
    wide = cells.pivot(on=column, index=row, values="cell", maintain_order=True)
    return wide.select(row, *[c for c in (*TRAINING_SETS, BASE) if c in wide.columns])


def alpaca_eval_table(results: pl.DataFrame) -> pl.DataFrame:
    """The report's view: win rate ± standard error per reference, the checkpoints side by side;
    'unjudged' where no pair had a preference, and how many pairs each rate rests on."""
    rate = (
        pl.when(pl.col("win_rate").is_null())
        .then(pl.lit("unjudged"))
        .otherwise(
            pl.format("{} ± {} ({} judged)", pl.col("win_rate").round(1), pl.col("standard_error").round(1), "n_total")
        )
    )
    table = side_by_side(results, "reference", "checkpoint", rate)
    counts = results.group_by("reference", maintain_order=True).agg(
        pl.col("n_total").sum().alias("judged"), pl.col("unjudged").sum(), pl.col("judge_calls").sum()
    )
    return table.join(counts, on="reference", how="left", maintain_order="left")


def _unjudged_sentence(unjudged: int, total: int, what: str, fix: str, failed: int = 0, truncated: int = 0) -> str:
    """What 'unjudged' means here, with its causes: failed calls, replies cut at max_tokens, or
    replies without a verdict (the bundled 135M judge's usual case)."""
    if total == 0:
        return "Nothing was judged."
    if unjudged == 0:
        return f"All {total} {what}s were judged."
    head = f"Every {what} is unjudged" if unjudged == total else f"{unjudged} of {total} {what}s are unjudged"
    parts = [f"{head}: left out, never guessed."]
    if failed:
        parts.append(f"{failed} judge calls failed for good (their kinds: the asset's failures_by_kind).")
    if truncated:
        parts.append(f"{truncated} judge replies ran out of tokens first (raise the asset's max_tokens).")
    if unjudged > failed:
        parts.append(f"The judge's replies held no {fix}.")
    if unjudged == total and not failed:
        parts.append(
            "A small judge (the bundled 135M model) cannot follow that format: these numbers need a capable "
            'one, such as a GPT-4-class endpoint (README, "AlpacaEval and MT-Bench").'
        )
    return " ".join(parts)


def alpaca_eval_section(results: pl.DataFrame) -> Section:
    """AlpacaEval win rates of selected, random and full side by side, with what 'unjudged' means."""
    pairs = int(results["instructions"].sum()) if results.height else 0
    sentence = _unjudged_sentence(
        int(results["unjudged"].sum()) if results.height else 0,
        pairs,
        "pair",
        "ranking alpaca_eval could parse",
        int(results["judge_failed"].sum()) if results.height else 0,
        int(results["judge_truncated"].sum()) if results.height else 0,
    )
    return Section(
        "AlpacaEval win rate (%)",
        "Each checkpoint's answers against a reference model's on the same AlpacaEval instructions "
        "(text_davinci_003: AlpacaEval 1.0, the paper's setting; gpt4_1106_preview: the 2.0 reference), "
        "computed by the alpaca-eval package with the judge resource as its annotator; 50 is parity. "
        f"{sentence} The length-controlled rate is alpaca_eval's: full 805 set, against gpt4_1106_preview, "
        "on request.",
        alpaca_eval_table(results) if results.height else None,
    )


def mt_bench_section(scores: pl.DataFrame) -> Section:
    """MT-Bench mean scores per checkpoint and turn, with what 'unjudged' means."""
    summary = score_summary(scores) if scores.height else pl.DataFrame()
    sentence = _unjudged_sentence(
        int(scores["score"].is_null().sum()),
        scores.height,
        "answer",
        "[[rating]]",
        int((scores["judge_status"] == "failed").sum()),
        int((scores["judge_status"] == "truncated").sum()),
    )
    table = None
    if summary.height:
        overall = summary.filter(pl.col("category") == "all")
        cell = (
            pl.when(pl.col("mean_score").is_null())
            .then(pl.lit("unjudged"))
            .otherwise(pl.format("{} ({} judged)", pl.col("mean_score").round(2), "judged"))
        )
        table = side_by_side(overall, "turn", "model", cell).join(
            overall.group_by("turn", maintain_order=True).agg(pl.col("unjudged").sum()), on="turn", how="left"
        )
    return Section(
        "MT-Bench (single-answer grading, 1–10)",
        "The judge grades each turn of each checkpoint's two-turn answers with FastChat's prompts (GPT-4 "
        f"reference answers for math, reasoning and coding). {sentence} Per category: mt_bench_scores.",
        table,
    )


ASSETS = [alpacaeval_outputs, alpacaeval_results, mt_bench_answers, mt_bench_scores]
REPORT_PARTS = [
    ReportPart(
        "AlpacaEval win rate", ("alpacaeval_results",), lambda i: [alpaca_eval_section(i.tables["alpacaeval_results"])]
    ),
    ReportPart("MT-Bench", ("mt_bench_scores",), lambda i: [mt_bench_section(i.tables["mt_bench_scores"])]),
]

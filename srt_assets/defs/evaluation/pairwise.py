"""Stage 8, pairwise: the held-out prompts, answers of every checkpoint to them, and pairwise verdicts
by the judge (the judge-free loss on reference answers is in reference_losses.py)."""

from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from srt_assets import paths
from srt_assets.core.evaluation import PROMPT_SCHEMA, REFERENCE_SETS, load_prompt_set
from srt_assets.core.generation import CallStats, GenerationParams
from srt_assets.core.judging import JUDGE_JSON_SCHEMA, JudgePrompt, judge_pair, pairwise_summary, parse_judge_reply
from srt_assets.core.quality import CheckOutcome
from srt_assets.core.sources import expand_shared_data
from srt_assets.defs.common import (
    blocking_checks,
    calls_progress,
    column_schema,
    json_value,
    judge_metadata,
    quantiles,
    table_value,
    to_check_results,
)
from srt_assets.defs.evaluation.steps import JUDGE_STEP, answer_with_checkpoints, checkpoint_step
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportPart
from srt_assets.plots import figure_png, markdown_table
from srt_assets.report import Figure, Section, verdict_figure, verdict_note
from srt_assets.resources import ChatModelResource, ComputeResource, StorageResource, StudentModelResource

ANSWER_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "answer": pl.String(),
    "answer_tokens": pl.Int64(),
    "cache_key": pl.String(),
}
VERDICT_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String(),
    "opponent": pl.String(),
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "score_model_first": pl.String(),  # "model other" as the judge rated them with the model shown first
    "score_model_second": pl.String(),
    "verdict": pl.String(),  # win | tie | lose | unjudged
    "judge_text_first": pl.String(),
    "judge_text_second": pl.String(),
    "cache_key_first": pl.String(),
    "cache_key_second": pl.String(),
}
VERDICT_CHECKS = {
    "verdict_per_prompt_and_pair": "every configured pair has a recorded verdict (or 'unjudged') for every prompt"
}


# Result checks in the style of Dagster's project_llm_fine_tune: a worse fine-tune warns, it does not block.
class EvaluationPromptsConfig(Config):
    data_dir: str = Field(
        "",
        description="folder with the test sets (default: $SRT_EVAL_DATA_DIR, else the repository's data/eval); "
        "may start with $SRT_SHARED_DATA (unset: ../shared/data beside the repository)",
    )
    sets: list[str] = Field(
        default=["vicuna", "koala", "wizardlm", "lima", "sinstruct"], description="held-out sets to judge on"
    )
    per_set: int | None = Field(2, description="prompts drawn per set (None: all; the paper uses all)")
    reference_count: int | None = Field(
        16, description="AlpacaEval prompts (None: all 805) whose reference answers the judge-free loss scores"
    )
    reference_sets: list[str] = Field(
        default=list(REFERENCE_SETS),
        description="the references of each such prompt: alpaca_eval (text-davinci-003), alpaca_eval_gpt4 "
        "(GPT-4-turbo)",
    )
    max_reference_chars: int | None = Field(
        None,
        description="score only the first N characters of each reference answer (the same for every model; "
        "GPT-4-turbo's run to 2,000 characters, which a CPU scores slowly)",
    )
    seed: int = 0


class AnswerConfig(Config):
    max_new_tokens: int = Field(96, description="greedy answer length (CPU demo size; the paper: up to 1024)")
    batch_size: int = 8


class JudgeConfig(Config):
    pairs: list[list[str]] = Field(
        default=[["selected", "full"], ["selected", "random"], ["selected", "teacher"]],
        description="[model, opponent] dataset pairs",
    )
    max_tokens: int = Field(48, description="judge reply length; the scores are on its first line")


def judge_pairs(
    context: AssetExecutionContext,
    answers: pl.DataFrame,
    config: JudgeConfig,
    judge: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> tuple[pl.DataFrame, CallStats]:
    """Judge every configured pair on every prompt in both orders through the cached judge;
    returns the verdict table and the call statistics."""
    prompt = JudgePrompt()
    by_dataset = {d: answers.filter(pl.col("dataset") == d) for d in answers["dataset"].unique()}
    jobs = []
    for model, opponent in config.pairs:
        if model not in by_dataset or opponent not in by_dataset:
            raise ValueError(f"judge pair {model} vs {opponent}: answers missing for one of them")
        joined = by_dataset[model].join(
            by_dataset[opponent].select("prompt_set", "prompt_id", pl.col("answer").alias("other")),
            on=["prompt_set", "prompt_id"],
        )
        jobs.extend((model, opponent, row) for row in joined.iter_rows(named=True))
    conversations = []
    for _, _, row in jobs:
        conversations.append(prompt.messages(row["prompt"], row["answer"], row["other"]))
        conversations.append(prompt.messages(row["prompt"], row["other"], row["answer"]))
    structured = judge.structured_output
    params = GenerationParams(
        temperature=0.0, max_tokens=config.max_tokens, json_schema=JUDGE_JSON_SCHEMA if structured else None
    )
    with judge.session(gpu, storage, calls_progress(context, "judge")) as cached:
        replies = cached.generate(conversations, params)
    context.log.info(f"judge calls: {cached.stats.calls} made, {cached.stats.cache_hits} from cache")
    records = []
    for index, (model, opponent, row) in enumerate(jobs):
        (key_1, first), (key_2, second) = replies[2 * index], replies[2 * index + 1]
        scores_1, scores_2 = parse_judge_reply(first.text, structured), parse_judge_reply(second.text, structured)
        records.append(
            {
                "model": model,
                "opponent": opponent,
                "prompt_set": row["prompt_set"],
                "prompt_id": row["prompt_id"],
                "score_model_first": " ".join(map(str, scores_1)) if scores_1 else None,
                "score_model_second": " ".join(map(str, scores_2)) if scores_2 else None,
                "verdict": judge_pair(scores_1, scores_2) or "unjudged",
                "judge_text_first": first.text,
                "judge_text_second": second.text,
                "cache_key_first": key_1,
                "cache_key_second": key_2,
            }
        )
    return pl.DataFrame(records, schema=VERDICT_SCHEMA), cached.stats


def verdict_checks(table: pl.DataFrame, answers: pl.DataFrame, config: JudgeConfig) -> list[CheckOutcome]:
    expected = answers.select("prompt_set", "prompt_id").n_unique() if answers.height else 0
    per_pair = table.group_by("model", "opponent").agg(pl.struct("prompt_set", "prompt_id").n_unique().alias("n"))
    short = per_pair.filter(pl.col("n") < expected).height
    return [
        CheckOutcome(
            "verdict_per_prompt_and_pair",
            per_pair.height == len(config.pairs) and short == 0 and expected > 0,
            VERDICT_CHECKS["verdict_per_prompt_and_pair"],
            {"pairs": per_pair.height, "expected_pairs": len(config.pairs), "prompts": expected},
        )
    ]


@asset(group_name="evaluation", kinds={"polars"}, metadata={"dagster/column_schema": column_schema(PROMPT_SCHEMA)})
def evaluation_prompts(context: AssetExecutionContext, config: EvaluationPromptsConfig) -> Output[pl.DataFrame]:
    """Held-out prompts (Vicuna, Koala, WizardLM, LIMA, Self-Instruct test sets) to judge on, and
    AlpacaEval prompts with reference answers for the judge-free loss. A clone ships a few per set
    (data/eval); point $SRT_EVAL_DATA_DIR at the full sets."""
    data_dir = Path(expand_shared_data(config.data_dir, paths.REPO_ROOT)) if config.data_dir else paths.eval_data_dir()
    parts = [load_prompt_set(data_dir, name, config.per_set, config.seed) for name in config.sets]
    if config.reference_count != 0:
        for name in config.reference_sets:
            references = load_prompt_set(data_dir, name, config.reference_count, config.seed)
            if config.max_reference_chars:
                references = references.with_columns(pl.col("reference").str.slice(0, config.max_reference_chars))
            parts.append(references)
    table = pl.concat(parts) if parts else pl.DataFrame(schema=PROMPT_SCHEMA)
    per_set = dict(table.group_by("prompt_set").len().sort("prompt_set").iter_rows())
    return Output(
        table,
        metadata={
            "data_dir": MetadataValue.path(str(data_dir)),
            "bundled_samples": data_dir == paths.BUNDLED_EVAL_DIR.resolve(),
            "prompts_per_set": table_value(per_set, "prompt set", "prompts"),
            "preview": MetadataValue.md(markdown_table(table.head(5))),
        },
    )


@asset(**checkpoint_step("student_base_model"), metadata={"dagster/column_schema": column_schema(ANSWER_SCHEMA)})
def evaluation_answers(
    context: AssetExecutionContext,
    config: AnswerConfig,
    evaluation_prompts: pl.DataFrame,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
) -> Output[pl.DataFrame]:
    """Greedy answers of every checkpoint to the held-out prompts. Cached per checkpoint content,
    so retraining one checkpoint regenerates only its answers."""
    prompts = evaluation_prompts.filter(pl.col("reference").is_null())
    conversations = [[{"role": "user", "content": p}] for p in prompts["prompt"]]
    params = GenerationParams(temperature=0.0, max_tokens=config.max_new_tokens)
    answers, stats = answer_with_checkpoints(
        storage,
        context.partition_key,
        student,
        gpu,
        config.batch_size,
        lambda answer: answer(conversations, params),
    )
    context.log.info(f"answers per checkpoint: {stats}")
    parts = [
        prompts.select("prompt_set", "prompt_id", "prompt").with_columns(
            pl.lit(dataset).alias("dataset"),
            pl.Series("answer", [g.text or "" for _, g in replies], dtype=pl.String),
            pl.Series("answer_tokens", [g.completion_tokens for _, g in replies], dtype=pl.Int64),
            pl.Series("cache_key", [k for k, _ in replies], dtype=pl.String),
        )
        for dataset, replies in answers.items()
    ]
    table = pl.concat(parts).select(*ANSWER_SCHEMA)
    return Output(
        table,
        metadata={
            "calls": table_value(stats, "checkpoint"),
            "generated": sum(s["generated"] for s in stats.values()),
            "answer_tokens": table_value(quantiles(table["answer_tokens"].cast(pl.Float64)), "quantile"),
            "examples": MetadataValue.md(
                markdown_table(table.select("dataset", "prompt_set", "prompt", "answer").head(6))
            ),
        },
    )


@asset(
    **JUDGE_STEP,
    metadata={"dagster/column_schema": column_schema(VERDICT_SCHEMA)},
    check_specs=blocking_checks("pairwise_verdicts", VERDICT_CHECKS, SOURCES),
)
def pairwise_verdicts(
    context: AssetExecutionContext,
    config: JudgeConfig,
    evaluation_answers: pl.DataFrame,
    judge: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
):
    """The judge compares each pair of checkpoints on every held-out prompt, in both answer orders
    (docs/method.md judge protocol); verdicts win/tie/lose from the first model's side."""
    table, stats = judge_pairs(context, evaluation_answers, config, judge, gpu, storage)
    summary = pairwise_summary(table)
    yield Output(
        table,
        metadata={
            "summary": MetadataValue.md(markdown_table(summary)),
            "summary_json": json_value(summary.to_dicts()),
            "unjudged": int((table["verdict"] == "unjudged").sum()),
            **judge_metadata(judge, stats),
        },
    )
    yield from to_check_results("pairwise_verdicts", verdict_checks(table, evaluation_answers, config))


def pairwise_sections(judgements: pl.DataFrame) -> list[Section]:
    """Win/tie/lose per pair of checkpoints, overall (with the chart) and per test set."""
    summary = pairwise_summary(judgements) if judgements.height else pl.DataFrame()
    judged = int(summary["judged"].sum()) if summary.height else 0
    overall = summary.filter(pl.col("prompt_set") == "all") if summary.height else summary
    chart = Figure("verdicts.png", figure_png(verdict_figure(summary))) if judged else None
    return [
        Section("Pairwise judging (all test sets)", verdict_note(judgements, judged), overall, chart, key="pairwise"),
        Section("Pairwise judging per test set", table=summary),
    ]


ASSETS = [evaluation_prompts, evaluation_answers, pairwise_verdicts]
REPORT_PARTS = [
    ReportPart("Pairwise judging", ("pairwise_verdicts",), lambda i: pairwise_sections(i.tables["pairwise_verdicts"])),
]

"""The field's knowledge check: the Open LLM Leaderboard v1 tasks (ARC-Challenge, HellaSwag, MMLU, TruthfulQA MC2)
on every checkpoint and the base student, through EleutherAI's lm-evaluation-harness (core/harness.py), offline:
a task whose data is absent reads "data absent", never 0, and a run capped at a few items per task says so."""

from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from srt_assets import paths
from srt_assets.core.cache import open_cache
from srt_assets.core.datasets import BASE
from srt_assets.core.harness import AVERAGE_TASK, LEADERBOARD_V1, TABLE_SCHEMA, BenchmarkData, run_leaderboard
from srt_assets.core.quality import CheckOutcome
from srt_assets.core.sources import expand_shared_data
from srt_assets.defs.common import blocking_checks, column_schema, table_value, to_check_results
from srt_assets.defs.evaluation.leaderboards import side_by_side
from srt_assets.defs.evaluation.steps import checkpoint_step
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportPart
from srt_assets.defs.training.assets import TRAINING_SETS, checkpoint_dir
from srt_assets.models.identity import ModelIdentity, model_identity
from srt_assets.plots import markdown_table
from srt_assets.report import Section
from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource

BENCHMARK_CHECKS = {
    "row_per_checkpoint_and_task": "every checkpoint and the base student has a row for every requested task "
    "and the leaderboard average (a task without data is a row 'data absent', never missing)"
}


class BenchmarkConfig(Config):
    limit: int | None = Field(
        5, description="items per task (a smoke run, labelled so); None: all, the leaderboard's own numbers (GPU)"
    )
    tasks: list[str] = Field(
        default=[task.name for task in LEADERBOARD_V1],
        description="leaderboard v1 tasks: arc_challenge, hellaswag, mmlu, truthfulqa_mc2",
    )
    hub_dir: str = Field(
        "",
        description="folder in the Hugging Face Hub's layout (<owner>/<name>/<config>/<split> files) holding "
        "allenai/ai2_arc, Rowan/hellaswag and cais/mmlu; may start with $SRT_SHARED_DATA (unset: ../shared/data "
        "beside the repository); empty: those tasks read 'data absent'",
    )
    batch_size: int = Field(1, description="lm-eval's batch size for the hf model")


def smoke_label(limit: int | None) -> str:
    """What the numbers are: a capped smoke run or the full data."""
    return f"smoke run: at most {limit} items per task" if limit is not None else "full data: every item of each task"


def benchmark_data(config: BenchmarkConfig) -> BenchmarkData:
    hub_dir = Path(expand_shared_data(config.hub_dir, paths.REPO_ROOT)) if config.hub_dir else None
    return BenchmarkData.default(hub_dir=hub_dir)


def checkpoint_models(storage: StorageResource, student: StudentModelResource, source: str) -> dict[str, ModelIdentity]:
    """Every checkpoint of the source (selected, random, full, teacher) and the base student, by label, with the
    fingerprint that keys their cached scores."""
    folders = {name: str(checkpoint_dir(storage, source, name)) for name in TRAINING_SETS}
    models = {name: model_identity(folder, storage.models_dir) for name, folder in folders.items()}
    return models | {BASE: student.identity_in(storage)}


def why_none() -> pl.Expr:
    """Why a row has no value, in a word or two: its status up to the first colon ("data absent", "not computed")."""
    return pl.col("status").str.split(":").list.first()


def score_cell() -> pl.Expr:
    """A score as a person reads it: value ± stderr (items), else why there is none ("data absent")."""
    scored = pl.format("{} ± {} ({} items)", pl.col("value").round(4), pl.col("stderr").round(4), "n_items")
    average = pl.col("value").round(4).cast(pl.String)
    return (
        pl.when(pl.col("value").is_null())
        .then(why_none())
        .when(pl.col("task") == AVERAGE_TASK)
        .then(average)
        .otherwise(pl.coalesce(scored, average))
    )


def scores_by_checkpoint(table: pl.DataFrame) -> pl.DataFrame:
    """One row per checkpoint, one column per task and the average."""
    cells = table.select("checkpoint", "task", score_cell().alias("cell"))
    return cells.pivot(on="task", index="checkpoint", values="cell", maintain_order=True)


def cost_by_checkpoint(table: pl.DataFrame) -> pl.DataFrame:
    """Seconds and tokens of each scored task per checkpoint ("data absent" where nothing ran)."""
    cost = pl.format("{} s, {} tokens", pl.col("seconds").round(1), "tokens")
    cells = table.filter(pl.col("task") != AVERAGE_TASK).select(
        "checkpoint", "task", pl.coalesce(cost, why_none()).alias("cell")
    )
    return cells.pivot(on="task", index="checkpoint", values="cell", maintain_order=True)


def row_outcome(table: pl.DataFrame, checkpoints: list[str], tasks: list[str]) -> CheckOutcome:
    have = set(table.select("checkpoint", "task").iter_rows())
    missing = [f"{c}/{t}" for c in checkpoints for t in [*tasks, AVERAGE_TASK] if (c, t) not in have]
    description = "every checkpoint has a row per task" if not missing else f"missing rows: {', '.join(missing)}"
    return CheckOutcome("row_per_checkpoint_and_task", not missing, description, {"missing": missing})


@asset(
    **checkpoint_step("student_base_model"),
    check_specs=blocking_checks("benchmark_scores", BENCHMARK_CHECKS, SOURCES),
    metadata={"dagster/column_schema": column_schema(TABLE_SCHEMA)},
)
def benchmark_scores(
    context: AssetExecutionContext,
    config: BenchmarkConfig,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
):
    """Open LLM Leaderboard v1 scores of every checkpoint and the base student through lm-evaluation-harness
    (lm_eval.simple_evaluate, model hf): ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot
    acc, TruthfulQA MC2 0-shot, and their average when all four were fully scored. Offline: local files only;
    a task without data reads "data absent", never 0."""
    source, data = context.partition_key, benchmark_data(config)
    settings = {"device": gpu.resolved_device(), "dtype": gpu.dtype, "batch_size": config.batch_size}
    settings |= {"limit": config.limit, "tasks": config.tasks}
    models, parts = checkpoint_models(storage, student, source), []
    cache = open_cache(storage.cache_location, "benchmarks")
    try:
        for name, model in models.items():
            context.log.info(
                f"lm-eval on {name} ({model.path}): {', '.join(config.tasks)}, {smoke_label(config.limit)}"
            )
            run_dir = storage.reports_dir / source / "lm_eval" / name
            part = run_leaderboard(
                Path(model.path), run_dir, data, label=name, cache=cache, fingerprint=model.fingerprint, **settings
            )
            parts.append(part)
    finally:
        cache.close()
    table = pl.concat(parts)
    scored = table.filter(pl.col("task") != AVERAGE_TASK, pl.col("value").is_not_null())
    context.log.info(f"lm-eval: {scored['from_cache'].sum()} of {scored.height} task scores read from the cache")
    first = parts[0].filter(pl.col("task") != AVERAGE_TASK)
    data_used = {r["task"]: r["data"] or r["status"] for r in first.iter_rows(named=True)}
    yield Output(
        table,
        metadata={
            "scores": MetadataValue.md(markdown_table(scores_by_checkpoint(table), max_chars=40)),
            "run": smoke_label(config.limit),
            "scores_from_cache": MetadataValue.int(int(scored["from_cache"].sum())),
            "scores_computed": MetadataValue.int(int((~scored["from_cache"]).sum())),
            "seconds_and_tokens": MetadataValue.md(markdown_table(cost_by_checkpoint(table), max_chars=40)),
            "data": table_value(data_used, "task", "data"),
            "settings": table_value(settings | {"tasks": ", ".join(config.tasks), "checkpoints": ", ".join(models)}),
        },
    )
    yield from to_check_results("benchmark_scores", [row_outcome(table, list(models), config.tasks)])


def benchmark_section(table: pl.DataFrame) -> Section:
    """The leaderboard tasks and average with selected, random, full, teacher and base side by side."""
    limits = table["limit"].drop_nulls().unique().to_list()
    label = smoke_label(max(limits)) if limits else smoke_label(None)
    absent = sorted(set(table.filter(pl.col("status").str.starts_with("data absent"))["task"]))
    absent_note = f" No data here for {', '.join(absent)}: shown as 'data absent', not scored." if absent else ""
    return Section(
        "Open LLM Leaderboard v1 (lm-evaluation-harness)",
        f"{label.capitalize()}. Each checkpoint and the base student on the leaderboard's v1 tasks through "
        "lm-evaluation-harness (ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc "
        "over 57 subjects unweighted, TruthfulQA MC2 0-shot), value ± standard error (items scored); the average "
        f"is given only when all four were scored (MMLU on all 57 subjects).{absent_note} Costs: benchmark_scores.",
        side_by_side(table, "task", "checkpoint", score_cell()) if table.height else None,
        key="open_llm_leaderboard_v1",
    )


ASSETS = [benchmark_scores]
REPORT_PARTS = [
    ReportPart(
        "Open LLM Leaderboard v1", ("benchmark_scores",), lambda i: [benchmark_section(i.tables["benchmark_scores"])]
    )
]

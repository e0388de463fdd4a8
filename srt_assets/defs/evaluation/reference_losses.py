"""Stage 8, the judge-free metric: every checkpoint's loss on AlpacaEval's reference answers (text-davinci-003's
and GPT-4-turbo's), selected minus each baseline with paired bootstrap intervals (WARN checks read the
intervals), and the random baseline's spread over more seeds."""

import polars as pl
from dagster import AssetCheckSeverity, AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from srt_assets.core.datasets import BASE, original_training_rows, random_baseline
from srt_assets.core.evaluation import LOSS_BASELINES, LossDifference, loss_comparisons, loss_differences
from srt_assets.defs.common import GPU_STEP, asset_checks, calls_progress, column_schema, to_check_results
from srt_assets.defs.evaluation.steps import checkpoint_step
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.report_parts import ReportPart
from srt_assets.defs.training.assets import (
    TRAINING_SETS,
    CheckpointModels,
    checkpoint_dir,
    checkpoint_manifests,
    dataset_fingerprint,
    train_checkpoint,
)
from srt_assets.plots import figure_png, line_figure, markdown_table
from srt_assets.report import Figure, Section, loss_figure
from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource, TrainingResource

LOSS_SCHEMA: dict[str, pl.DataType] = {
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "dataset": pl.String(),
    "loss": pl.Float64(),
    "base_loss": pl.Float64(),
    "tokens": pl.Int64(),
}
LOSS_CHECKS = {
    f"selected_beats_{baseline}": f"on the judge-free metric, the model tuned on selected data has a lower "
    f"reference loss than {label}: the 95% paired bootstrap interval of the difference lies below zero on every "
    "reference set"
    for baseline, label in LOSS_BASELINES.items()
}
SEED_SCHEMA: dict[str, pl.DataType] = {
    "draw": pl.String(),  # baseline_random, or "seed <k>"
    "seed": pl.Int64(),  # null for baseline_random (its seed is that asset's config)
    "rows": pl.Int64(),
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "loss": pl.Float64(),
}


def reference_pairs(evaluation_prompts: pl.DataFrame) -> pl.DataFrame:
    """The prompts with a reference answer, the rows every checkpoint is scored on."""
    return evaluation_prompts.filter(pl.col("reference").is_not_null())


def answer_losses(
    context: AssetExecutionContext,
    models: tuple[StudentModelResource, ComputeResource, StorageResource],
    rows: pl.DataFrame,
    model: str | None,
    label: str,
) -> tuple[list[float], list[int]]:
    """Each reference answer's mean loss given its prompt under one model (None: the base student), with a
    progress line every few seconds: 805 prompts × 2 references is most of an hour per model on a CPU."""
    student, gpu, storage = models
    progress = calls_progress(context, f"reference loss of {label}", unit="texts")
    with student.session(gpu, storage, model_path=model, progress=progress) as session:
        return session.answer_losses(rows.select("prompt", "reference").rows())


def difference_table(differences: list[LossDifference]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "reference_set": d.reference_set,
                "selected_minus": d.baseline,
                "pairs": d.pairs,
                "selected": d.selected,
                "baseline": d.other,
                "difference": d.difference,
                "ci95_low": d.low,
                "ci95_high": d.high,
            }
            for d in differences
        ],
        schema={
            "reference_set": pl.String(),
            "selected_minus": pl.String(),
            "pairs": pl.Int64(),
            "selected": pl.Float64(),
            "baseline": pl.Float64(),
            "difference": pl.Float64(),
            "ci95_low": pl.Float64(),
            "ci95_high": pl.Float64(),
        },
    )


@asset(
    **checkpoint_step("student_base_model"),
    metadata={"dagster/column_schema": column_schema(LOSS_SCHEMA)},
    check_specs=asset_checks("reference_loss", LOSS_CHECKS, SOURCES, blocking=False),
)
def reference_loss(
    context: AssetExecutionContext,
    evaluation_prompts: pl.DataFrame,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
):
    """Judge-free metric: each checkpoint's loss on AlpacaEval reference answers (davinci-003's and
    GPT-4-turbo's), next to the base student's; lower is better. The checks compare the selected-data
    model with each baseline by the interval of the paired difference, not by one number."""
    rows = reference_pairs(evaluation_prompts)
    scoring = (student, gpu, storage)
    base_losses, _ = answer_losses(context, scoring, rows, None, BASE)
    parts = []
    for dataset in TRAINING_SETS:
        model = str(checkpoint_dir(storage, context.partition_key, dataset))
        losses, tokens = answer_losses(context, scoring, rows, model, dataset)
        parts.append(
            rows.select("prompt_set", "prompt_id").with_columns(
                pl.lit(dataset).alias("dataset"),
                pl.Series("loss", losses, dtype=pl.Float64),
                pl.Series("base_loss", base_losses, dtype=pl.Float64),
                pl.Series("tokens", tokens, dtype=pl.Int64),
            )
        )
    table = pl.concat(parts).select(*LOSS_SCHEMA)
    differences = loss_differences(table)
    yield Output(
        table,
        metadata={
            "mean_loss": MetadataValue.md(markdown_table(mean_table(table))),
            "selected_minus_baselines": MetadataValue.md(markdown_table(difference_table(differences))),
        },
    )
    yield from to_check_results("reference_loss", loss_comparisons(differences), severity=AssetCheckSeverity.WARN)


def mean_table(losses: pl.DataFrame) -> pl.DataFrame:
    """Mean loss per checkpoint (and the base student) per reference set, finite answers only."""
    finite = pl.col("loss").filter(pl.col("loss").is_finite())
    per_set = losses.group_by("prompt_set", "dataset").agg(finite.mean().round(4).alias("mean_loss"))
    base = (
        losses.filter(pl.col("base_loss").is_finite())
        .group_by("prompt_set")
        .agg(pl.lit(BASE).alias("dataset"), pl.col("base_loss").mean().round(4).alias("mean_loss"))
    )
    both = pl.concat([per_set, base.select(per_set.columns)])
    return both.pivot(on="prompt_set", index="dataset", values="mean_loss").sort("dataset")


class RandomSeedsConfig(Config):
    seeds: list[int] = Field(
        default=[1, 2],
        description="more random draws of the selected set's size beside baseline_random's, each fine-tuned with "
        "the same training settings and scored on the same references: the random baseline's spread",
    )


@asset(
    partitions_def=SOURCES,
    group_name="evaluation",
    kinds={"pytorch", "polars"},
    metadata={"dagster/column_schema": column_schema(SEED_SCHEMA)},
    **GPU_STEP,
)
def random_seed_losses(
    context: AssetExecutionContext,
    config: RandomSeedsConfig,
    raw_samples: pl.DataFrame,
    selected_dataset: pl.DataFrame,
    baseline_random: pl.DataFrame,
    evaluation_prompts: pl.DataFrame,
    reference_loss: pl.DataFrame,
    student: StudentModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
    training: TrainingResource,
):
    """How much the random baseline moves with its seed: more random draws, each trained like the
    checkpoints (reused when identical) and scored on the same references, beside baseline_random's.
    A selected-data model that beats one lucky or unlucky draw has not shown much."""
    source, rows = context.partition_key, reference_pairs(evaluation_prompts)
    main = reference_loss.filter(pl.col("dataset") == "random")
    parts = [main.select(pl.lit("baseline_random").alias("draw"), pl.lit(None, pl.Int64).alias("seed"),
                         pl.lit(baseline_random.height).alias("rows"), "prompt_set", "prompt_id", "loss")]  # fmt: skip
    models = CheckpointModels(student, gpu, storage, training)
    seen = {dataset_fingerprint(baseline_random)}
    for seed in config.seeds:
        drawn = random_baseline(original_training_rows(raw_samples), selected_dataset.height, seed)
        fingerprint = dataset_fingerprint(drawn)
        if fingerprint in seen:
            context.log.info(f"seed {seed} draws the same rows as an earlier draw: left out")
            continue
        seen.add(fingerprint)
        out_dir = checkpoint_dir(storage, source, f"random_seed{seed}")
        trained = train_checkpoint(context, out_dir, f"baseline_random (seed {seed})", drawn, models)
        losses, _ = answer_losses(context, (student, gpu, storage), rows, str(trained.out_dir), f"seed {seed}")
        parts.append(
            rows.select("prompt_set", "prompt_id").with_columns(
                pl.lit(f"seed {seed}").alias("draw"),
                pl.lit(seed, pl.Int64).alias("seed"),
                pl.lit(drawn.height, pl.Int64).alias("rows"),
                pl.Series("loss", losses, dtype=pl.Float64),
            )
        )
    table = pl.concat([part.select(*SEED_SCHEMA).cast(SEED_SCHEMA) for part in parts])
    spread = seed_spread(table, reference_loss)
    return Output(table, metadata={"spread": MetadataValue.md(markdown_table(spread)), "draws": len(parts)})


def seed_spread(seeds: pl.DataFrame, reference_loss: pl.DataFrame) -> pl.DataFrame:
    """Per reference set: each random draw's mean loss, their spread, and the selected model's mean."""
    finite = pl.col("loss").filter(pl.col("loss").is_finite())
    per_draw = seeds.group_by("prompt_set", "draw").agg(finite.mean().alias("mean")).sort("prompt_set", "draw")
    selected = (
        reference_loss.filter(pl.col("dataset") == "selected")
        .group_by("prompt_set")
        .agg(finite.mean().alias("selected"))
    )
    return (
        per_draw.group_by("prompt_set", maintain_order=True)
        .agg(
            pl.len().alias("draws"),
            pl.col("mean").mean().round(4).alias("random_mean"),
            pl.col("mean").std().round(4).alias("random_std"),
            pl.col("mean").min().round(4).alias("random_min"),
            pl.col("mean").max().round(4).alias("random_max"),
        )
        .join(selected.with_columns(pl.col("selected").round(4)), on="prompt_set", how="left")
    )


def training_sections(reference_losses: pl.DataFrame, manifests: dict[str, dict | None]) -> list[Section]:
    """Each checkpoint's training facts beside its judge-free loss per reference set, and the curves."""
    means = mean_table(reference_losses) if reference_losses.height else pl.DataFrame({"dataset": []})
    rows = []
    for dataset, manifest in manifests.items():
        training = (manifest or {}).get("training", {})
        mine = means.filter(pl.col("dataset") == dataset).drop("dataset").to_dicts() if means.height else []
        rows.append(
            {
                "dataset": dataset,
                "rows": (manifest or {}).get("rows"),
                "steps": training.get("steps"),
                "final_train_loss": (manifest or {}).get("final_loss"),
                "train_seconds": training.get("seconds"),
                **{f"loss_{name}": value for name, value in (mine[0] if mine else {}).items()},
            }
        )
    base = means.filter(pl.col("dataset") == BASE).drop("dataset").to_dicts() if means.height else []
    if base:
        rows.append({"dataset": BASE, **{f"loss_{name}": value for name, value in base[0].items()}})
    curves = {d: (m or {}).get("training", {}).get("losses", []) for d, m in manifests.items()}
    losses = Figure("reference_loss.png", figure_png(loss_figure(reference_losses)))
    training_curves = Figure(
        "training_curves.png", figure_png(line_figure({d: c for d, c in curves.items() if c}, "optimizer step"))
    )
    return [
        Section(
            "Training and reference-answer loss (lower is better)",
            "Mean loss per answer token on each reference set (alpaca_eval: text-davinci-003's answers; "
            "alpaca_eval_gpt4: GPT-4-turbo's), every checkpoint on the same answers.",
            table=pl.DataFrame(rows),
            figure=losses,
            key="training",
        ),
        Section("Training curves", figure=training_curves),
    ]


def difference_sections(reference_losses: pl.DataFrame) -> list[Section]:
    note = (
        "Selected minus each baseline, per reference set: the mean of the paired per-answer differences with a "
        "95% bootstrap interval over the prompts (negative: the selected-data model fits the reference answers "
        "better). An interval that contains zero shows no difference."
    )
    table = difference_table(loss_differences(reference_losses))
    return [Section("Selected vs each baseline, with 95% intervals", note, table, key="loss_differences")]


def seed_sections(inputs) -> list[Section]:
    spread = seed_spread(inputs.tables["random_seed_losses"], inputs.tables["reference_loss"])
    note = (
        "The random baseline over several seeds (baseline_random and the draws of random_seed_losses, each "
        "trained alike): its mean, spread and range of mean reference loss, beside the selected-data model's."
    )
    return [Section("The random baseline over seeds", note, spread, key="random_seeds")]


ASSETS = [reference_loss, random_seed_losses]
REPORT_PARTS = [
    ReportPart(
        "Training and reference-answer loss",
        ("reference_loss",),
        lambda i: training_sections(i.tables["reference_loss"], checkpoint_manifests(i.storage, i.source)),
    ),
    ReportPart(
        "Selected vs each baseline, with 95% intervals",
        ("reference_loss",),
        lambda i: difference_sections(i.tables["reference_loss"]),
    ),
    ReportPart("The random baseline over seeds", ("random_seed_losses", "reference_loss"), seed_sections),
]

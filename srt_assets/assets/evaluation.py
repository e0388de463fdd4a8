"""Stage 8: answers of every checkpoint on held-out prompts, pairwise judging by the teacher, a
judge-free loss on reference answers, and the experiment report."""

import json
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    PartitionsDefinition,
    asset,
)
from pydantic import Field

from srt_assets import paths
from srt_assets.assets.common import GPU_STEP, markdown_table, quantiles, to_check_results
from srt_assets.assets.finetuning import CHECKPOINT_KEYS, DATASETS, checkpoint_dir
from srt_assets.assets.reflection import teacher_session
from srt_assets.assets.scoring import model_identity, student_session
from srt_assets.core.cache import SqliteCache
from srt_assets.core.evaluation import PROMPT_SCHEMA, load_prompt_set
from srt_assets.core.ifd import ScoringConfig
from srt_assets.core.judging import (
    JUDGE_JSON_SCHEMA,
    JudgePrompt,
    judge_pair,
    pairwise_summary,
    parse_judge_scores,
)
from srt_assets.core.quality import CheckOutcome
from srt_assets.core.teacher import CachedTeacher, GenerationParams
from srt_assets.models.loading import model_fingerprint
from srt_assets.models.student import build_text_builder
from srt_assets.report import build_report, finite_mean
from srt_assets.resources import GPUResource, StorageResource, StudentModelResource, TeacherResource

ANSWER_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "prompt_set": pl.String(),
    "prompt_id": pl.String(),
    "prompt": pl.String(),
    "answer": pl.String(),
    "answer_tokens": pl.Int64(),
    "cache_key": pl.String(),
}


class EvaluationPromptsConfig(Config):
    data_dir: str = Field("", description="folder with the test sets (default: $SRT_EVAL_DATA_DIR or ../shared/data)")
    sets: list[str] = Field(
        default=["vicuna", "koala", "wizardlm", "lima", "sinstruct"], description="held-out sets to judge on"
    )
    per_set: int | None = Field(2, description="prompts drawn per set (None: all; the paper uses all)")
    reference_count: int | None = Field(16, description="AlpacaEval reference answers for the judge-free loss")
    seed: int = 0


class AnswerConfig(Config):
    max_new_tokens: int = Field(96, description="greedy answer length (CPU demo size; the paper: up to 1024)")
    batch_size: int = 8


class JudgeConfig(Config):
    pairs: list[list[str]] = Field(
        default=[["selected", "full"], ["selected", "random"]], description="[model, opponent] dataset pairs"
    )
    max_tokens: int = Field(48, description="judge reply length; the scores are on its first line")


class TemplatedGenerator:
    """A checkpoint as a TeacherBackend: renders the user turn with the training template and
    continues it greedily, so answers go through the same durable call cache as teacher calls.
    The model loads on the first cache miss."""

    def __init__(self, model_path: str, template: str, device: str, dtype: str, batch_size: int):
        self.model_id = f"checkpoint:{model_fingerprint(Path(model_path))}|{template}"
        self._settings = {"device": device, "dtype": dtype, "batch_size": batch_size}
        self._model_path = model_path
        self._template = template
        self._model = None

    def generate(self, conversations, params):
        from srt_assets.models.teacher_local import TransformersTeacher

        if self._model is None:
            self._model = TransformersTeacher(self._model_path, model_id=self.model_id, **self._settings)
            self._render = build_text_builder(self._model.tokenizer, self._template, ScoringConfig()).template.render
        return self._model.generate_texts([self._render(m[-1]["content"]) for m in conversations], params)


def reference_losses(
    context, model_path: str, rows: pl.DataFrame, student, gpu, storage
) -> tuple[list[float], list[int]]:
    """Mean loss of ``model_path`` on each reference answer given its prompt (training template)."""
    fingerprint = model_fingerprint(Path(model_path))
    with student_session(context, model_path, fingerprint, gpu, student, storage) as (builder, scorer, _):
        prompts = rows.select("prompt", "reference").rows()
        texts = [builder.part(builder.template.render(p) + r, r) for p, r in prompts]
        losses = scorer.mean_losses([t.ids for t in texts], [max(t.target_start, 1) for t in texts])
    return losses, [t.n_targets for t in texts]


def build_evaluation_assets(source_partitions: PartitionsDefinition):
    # the model steps that read all three checkpoints of a source
    checkpoint_step = {
        "partitions_def": source_partitions,
        "group_name": "evaluation",
        "kinds": {"pytorch", "polars"},
        "deps": CHECKPOINT_KEYS,
        **GPU_STEP,
    }

    @asset(group_name="evaluation", kinds={"polars"})
    def evaluation_prompts(context: AssetExecutionContext, config: EvaluationPromptsConfig) -> Output[pl.DataFrame]:
        """Held-out prompts (Vicuna, Koala, WizardLM, LIMA, Self-Instruct test sets) to judge on, and
        AlpacaEval prompts with reference answers for the judge-free loss."""
        data_dir = Path(config.data_dir) if config.data_dir else paths.eval_data_dir()
        parts = [load_prompt_set(data_dir, name, config.per_set, config.seed) for name in config.sets]
        if config.reference_count != 0:
            parts.append(load_prompt_set(data_dir, "alpaca_eval", config.reference_count, config.seed))
        table = pl.concat(parts) if parts else pl.DataFrame(schema=PROMPT_SCHEMA)
        per_set = dict(table.group_by("prompt_set").len().sort("prompt_set").iter_rows())
        return Output(
            table,
            metadata={
                "row_count": table.height,
                "data_dir": MetadataValue.path(str(data_dir)),
                "prompts_per_set": MetadataValue.json(per_set),
                "preview": MetadataValue.md(markdown_table(table.head(5))),
            },
        )

    @asset(**checkpoint_step)
    def evaluation_answers(
        context: AssetExecutionContext,
        config: AnswerConfig,
        evaluation_prompts: pl.DataFrame,
        student: StudentModelResource,
        gpu: GPUResource,
        storage: StorageResource,
    ) -> Output[pl.DataFrame]:
        """Greedy answers of every checkpoint to the held-out prompts. Cached per checkpoint content,
        so retraining one checkpoint regenerates only its answers."""
        prompts = evaluation_prompts.filter(pl.col("reference").is_null())
        conversations = [[{"role": "user", "content": p}] for p in prompts["prompt"]]
        params = GenerationParams(temperature=0.0, max_tokens=config.max_new_tokens)
        parts, stats = [], {}
        cache = SqliteCache(storage.cache_file, "answers")
        try:
            for dataset in DATASETS:
                model_path = str(checkpoint_dir(storage, context.partition_key, dataset))
                generator = TemplatedGenerator(
                    model_path, student.template, gpu.resolved_device(), gpu.dtype, config.batch_size
                )
                cached = CachedTeacher(generator, cache, chunk_size=32)
                replies = cached.generate(conversations, params)
                stats[dataset] = {"generated": cached.stats.calls, "from_cache": cached.stats.cache_hits}
                context.log.info(f"answers of checkpoint '{dataset}': {stats[dataset]}")
                parts.append(
                    prompts.select("prompt_set", "prompt_id", "prompt").with_columns(
                        pl.lit(dataset).alias("dataset"),
                        pl.Series("answer", [g.text or "" for _, g in replies], dtype=pl.String),
                        pl.Series("answer_tokens", [g.completion_tokens for _, g in replies], dtype=pl.Int64),
                        pl.Series("cache_key", [k for k, _ in replies], dtype=pl.String),
                    )
                )
        finally:
            cache.close()
        table = pl.concat(parts).select(*ANSWER_SCHEMA)
        return Output(
            table,
            metadata={
                "row_count": table.height,
                "calls": MetadataValue.json(stats),
                "generated": sum(s["generated"] for s in stats.values()),
                "answer_tokens": MetadataValue.json(quantiles(table["answer_tokens"].cast(pl.Float64))),
                "examples": MetadataValue.md(
                    markdown_table(table.select("dataset", "prompt_set", "prompt", "answer").head(6))
                ),
            },
        )

    @asset(**checkpoint_step)
    def reference_answer_loss(
        context: AssetExecutionContext,
        evaluation_prompts: pl.DataFrame,
        student: StudentModelResource,
        gpu: GPUResource,
        storage: StorageResource,
    ) -> Output[pl.DataFrame]:
        """Judge-free metric: each checkpoint's mean loss on AlpacaEval reference answers, next to the
        base student's (lower is better; the difference is what fine-tuning changed)."""
        rows = evaluation_prompts.filter(pl.col("reference").is_not_null())
        base_path, _ = model_identity(student, storage)
        base_losses, _ = reference_losses(context, base_path, rows, student, gpu, storage)
        parts = []
        for dataset in DATASETS:
            model_path = str(checkpoint_dir(storage, context.partition_key, dataset))
            losses, tokens = reference_losses(context, model_path, rows, student, gpu, storage)
            parts.append(
                rows.select("prompt_set", "prompt_id").with_columns(
                    pl.lit(dataset).alias("dataset"),
                    pl.Series("loss", losses, dtype=pl.Float64),
                    pl.Series("base_loss", base_losses, dtype=pl.Float64),
                    pl.Series("tokens", tokens, dtype=pl.Int64),
                )
            )
        table = pl.concat(parts)
        means = {d: round(finite_mean(table.filter(pl.col("dataset") == d)["loss"]), 4) for d in DATASETS}
        means["base"] = round(finite_mean(table["base_loss"]), 4)
        return Output(table, metadata={"row_count": table.height, "mean_loss": MetadataValue.json(means)})

    @asset(
        partitions_def=source_partitions,
        group_name="evaluation",
        kinds={"polars"},
        **GPU_STEP,
        check_specs=[AssetCheckSpec("verdict_per_prompt_and_pair", asset="pairwise_judgements", blocking=True)],
    )
    def pairwise_judgements(
        context: AssetExecutionContext,
        config: JudgeConfig,
        evaluation_answers: pl.DataFrame,
        teacher: TeacherResource,
        gpu: GPUResource,
        storage: StorageResource,
    ):
        """The teacher judges each pair of checkpoints on every held-out prompt, in both answer orders
        (METHOD.md judge protocol); verdicts win/tie/lose from the first model's side."""
        answers = evaluation_answers
        table, stats = judge_pairs(context, answers, config, teacher, gpu, storage)
        summary = pairwise_summary(table)
        yield Output(
            table,
            metadata={
                "row_count": table.height,
                "summary": MetadataValue.md(markdown_table(summary)),
                "summary_json": MetadataValue.json(summary.to_dicts()),
                **teacher.describe(),
                "calls_made": stats["calls"],
                "cache_hits": stats["cache_hits"],
                "failures_by_kind": MetadataValue.json(stats["failures"]),
            },
        )
        expected = answers["prompt_id"].n_unique() if answers.height else 0
        per_pair = table.group_by("model", "opponent").agg(pl.struct("prompt_set", "prompt_id").n_unique().alias("n"))
        short = per_pair.filter(pl.col("n") < per_pair["n"].max()).height if per_pair.height else 0
        yield from to_check_results(
            "pairwise_judgements",
            [
                CheckOutcome(
                    "verdict_per_prompt_and_pair",
                    per_pair.height == len(config.pairs) and short == 0 and expected > 0,
                    "every configured pair has a recorded verdict (or 'unjudged') for every prompt",
                    {"pairs": per_pair.height, "expected_pairs": len(config.pairs), "prompts": expected},
                )
            ],
        )

    @asset(
        partitions_def=source_partitions,
        group_name="evaluation",
        kinds={"polars"},
        deps=CHECKPOINT_KEYS,
    )
    def experiment_report(
        context: AssetExecutionContext,
        pairwise_judgements: pl.DataFrame,
        reference_answer_loss: pl.DataFrame,
        storage: StorageResource,
    ) -> MaterializeResult:
        """Selected vs random vs full: win/tie/lose per test set, reference-answer loss, training
        curves; shown here and written as Markdown and HTML with PNG figures."""
        from srt_assets.models.trainer import read_manifest

        source = context.partition_key
        manifests = {d: read_manifest(checkpoint_dir(storage, source, d)) for d in DATASETS}
        report = build_report(
            source, pairwise_judgements, reference_answer_loss, manifests, storage.reports_dir / source
        )
        return MaterializeResult(
            metadata={
                "report_markdown": MetadataValue.path(str(report.markdown_path)),
                "report_html": MetadataValue.path(str(report.html_path)),
                "report": MetadataValue.md(report.inline_markdown),
                "results": MetadataValue.json(report.results),
            }
        )

    return [evaluation_prompts, evaluation_answers, reference_answer_loss, pairwise_judgements, experiment_report]


JUDGEMENT_SCHEMA: dict[str, pl.DataType] = {
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


def _parse(text: str | None, structured: bool) -> tuple[float, float] | None:
    if not structured:
        return parse_judge_scores(text)
    try:
        data = json.loads(text or "")
        return float(data["score_1"]), float(data["score_2"])
    except (ValueError, KeyError, TypeError):
        return None


def judge_pairs(context, answers: pl.DataFrame, config: JudgeConfig, teacher, gpu, storage):
    """Judge every configured pair on every prompt in both orders through the cached teacher;
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
    params = GenerationParams(
        temperature=0.0,
        max_tokens=config.max_tokens,
        json_schema=JUDGE_JSON_SCHEMA if teacher.structured_output else None,
    )
    progress = lambda done, total: context.log.info(f"judge: {done}/{total} calls done")  # noqa: E731
    with teacher_session(teacher, gpu, storage, progress) as cached:
        replies = cached.generate(conversations, params)
    context.log.info(f"judge calls: {cached.stats.calls} made, {cached.stats.cache_hits} from cache")
    records = []
    for index, (model, opponent, row) in enumerate(jobs):
        (key_1, first), (key_2, second) = replies[2 * index], replies[2 * index + 1]
        scores_1 = _parse(first.text, teacher.structured_output)
        scores_2 = _parse(second.text, teacher.structured_output)
        verdict = judge_pair(scores_1, scores_2)
        records.append(
            {
                "model": model,
                "opponent": opponent,
                "prompt_set": row["prompt_set"],
                "prompt_id": row["prompt_id"],
                "score_model_first": " ".join(map(str, scores_1)) if scores_1 else None,
                "score_model_second": " ".join(map(str, scores_2)) if scores_2 else None,
                "verdict": verdict or "unjudged",
                "judge_text_first": first.text,
                "judge_text_second": second.text,
                "cache_key_first": key_1,
                "cache_key_second": key_2,
            }
        )
    return pl.DataFrame(records, schema=JUDGEMENT_SCHEMA), cached.stats.as_dict()

"""Stages 2 and 4: the teacher's instruction and response reflection, every call cached."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)

from srt_assets.assets.common import GPU_STEP, Partitioning, markdown_table, to_check_results
from srt_assets.assets.scoring import model_identity, score_variants
from srt_assets.core.cache import SqliteCache
from srt_assets.core.quality import CheckOutcome, ratio_check
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import CachedTeacher, GenerationParams, ReflectionOutcome, ReflectionSettings, reflect
from srt_assets.core.variants import VARIANT_SCHEMA, original_variants
from srt_assets.models.loading import BUNDLED_MODEL
from srt_assets.resources import GPUResource, StorageResource, StudentModelResource, TeacherResource

CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    **VARIANT_SCHEMA,
    "status": pl.String(),
    "error": pl.String(),
    "raw_text": pl.String(),
    "cache_key": pl.String(),
    "attempts": pl.Int64(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
}
CANDIDATE_CHECKS = ("parse_failure_ratio_below_bound", "one_candidate_per_input")


class ReflectionConfig(Config):
    max_failure_ratio: float = 1.0  # the embedded 135M teacher breaks the markers often; tighten for real teachers
    chunk_size: int = 32


def build_teacher(teacher: TeacherResource, gpu: GPUResource, storage: StorageResource):
    """The configured backend, wired from resources (the only place that knows all three)."""
    if teacher.backend == "openai":
        from srt_assets.models.teacher_http import OpenAICompatibleTeacher, RetryPolicy

        if not teacher.base_url:
            raise ValueError("teacher backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAICompatibleTeacher(
            teacher.base_url,
            teacher.model,
            api_key=teacher.resolved_api_key(),
            concurrency=teacher.concurrency,
            timeout_s=teacher.timeout_s,
            retry=RetryPolicy(max_retries=teacher.max_retries, backoff_base=teacher.backoff_base),
            cost_per_1k_input=teacher.cost_per_1k_input,
            cost_per_1k_output=teacher.cost_per_1k_output,
        )
    model_path, fingerprint = model_identity(StudentModelResource(model=teacher.model), storage)
    if teacher.backend == "vllm":
        from srt_assets.models.teacher_local import VLLMTeacher

        return VLLMTeacher(model_path, model_id=f"vllm:{fingerprint}", dtype=gpu.dtype)
    from srt_assets.models.teacher_local import TransformersTeacher

    return TransformersTeacher(
        model_path,
        model_id=f"transformers:{fingerprint}",
        device=gpu.resolved_device(),
        dtype=gpu.dtype,
        batch_size=teacher.batch_size,
    )


class LazyTeacher:
    """Builds the backend on the first cache miss: a rerun served from the cache loads no model."""

    def __init__(self, teacher: TeacherResource, gpu: GPUResource, storage: StorageResource):
        self._args = (teacher, gpu, storage)
        self._backend = None
        self.was_loaded = False  # whether any call needed the model (kept after close, for metadata)
        if teacher.backend == "openai":
            self.model_id = f"openai-compatible:{teacher.model}"
        else:
            _, fingerprint = model_identity(StudentModelResource(model=teacher.model), storage)
            self.model_id = f"{teacher.backend}:{fingerprint}"

    def generate(self, conversations, params):
        if self._backend is None:
            self._backend = build_teacher(*self._args)
            self.was_loaded = True
        return self._backend.generate(conversations, params)

    def close(self) -> None:
        if self._backend is not None and hasattr(self._backend, "close"):
            self._backend.close()
        self._backend = None


SMALL_TEACHER_PROMPTS = Path(__file__).resolve().parent.parent / "prompts" / "small_teacher.yaml"


def prompts_file(teacher: TeacherResource) -> str:
    """The prompt file in use: 'auto' picks the compact, prefilled prompts for the bundled 135M model
    (it rarely reaches the markers after a written analysis) and the full prompts for any other."""
    if teacher.prompts_file != "auto":
        return teacher.prompts_file
    return str(SMALL_TEACHER_PROMPTS) if teacher.backend != "openai" and teacher.model == BUNDLED_MODEL else ""


@contextmanager
def teacher_session(teacher, gpu, storage, progress=None, chunk_size: int = 64) -> Iterator[CachedTeacher]:
    """The configured teacher behind the durable call cache (reflection and judging alike): the
    model loads on the first cache miss and is released on exit."""
    backend = LazyTeacher(teacher, gpu, storage)
    cache = SqliteCache(storage.cache_file, "teacher_calls")
    try:
        yield CachedTeacher(backend, cache, chunk_size=chunk_size, progress=progress)
    finally:
        backend.close()
        cache.close()


def reflection_settings(teacher: TeacherResource) -> tuple[ReflectionPrompts, ReflectionSettings]:
    file = prompts_file(teacher)
    prompts = ReflectionPrompts.from_file(file) if file else ReflectionPrompts()
    params = GenerationParams(temperature=teacher.temperature, top_p=teacher.top_p, max_tokens=teacher.max_tokens)
    return prompts, ReflectionSettings(
        params=params, parse_retries=teacher.parse_retries, structured=teacher.structured_output
    )


def run_reflection(
    context: AssetExecutionContext,
    rows: pl.DataFrame,
    kind: str,
    produced_variants: list[str],
    teacher: TeacherResource,
    gpu: GPUResource,
    storage: StorageResource,
    chunk_size: int,
) -> tuple[pl.DataFrame, dict]:
    """Reflect ``rows`` (variant-schema rows) and return candidate rows plus call statistics."""
    prompts, settings = reflection_settings(teacher)
    progress = lambda done, total: context.log.info(f"teacher ({kind}): {done}/{total} calls done")  # noqa: E731
    triples = [(r["instruction"], r["input"], r["output"]) for r in rows.iter_rows(named=True)]
    with teacher_session(teacher, gpu, storage, progress, chunk_size) as cached:
        outcomes = reflect(cached, triples, kind, prompts, settings)
    table = candidates_frame(rows, outcomes, kind, produced_variants)
    stats = cached.stats.as_dict() | {"model_loaded": cached.backend.was_loaded}
    return table, stats


def candidates_frame(
    rows: pl.DataFrame, outcomes: list[ReflectionOutcome], kind: str, produced_variants: list[str]
) -> pl.DataFrame:
    records = []
    for row, outcome, variant in zip(rows.iter_rows(named=True), outcomes, produced_variants, strict=True):
        records.append(
            {
                "sample_id": row["sample_id"],
                "variant": variant,
                # Instruction reflection writes a self-contained instruction (no separate input);
                # its fallback is the original pair, input merged as in METHOD.md "Records".
                "instruction": outcome.instruction if kind == "instruction" else row["instruction"],
                "input": "" if kind == "instruction" and outcome.status == "ok" else row["input"],
                "output": outcome.answer,
                "status": outcome.status,
                "error": outcome.error,
                "raw_text": outcome.raw_text,
                "cache_key": outcome.cache_key,
                "attempts": outcome.attempts,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
            }
        )
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def candidate_metadata(table: pl.DataFrame, stats: dict, teacher: TeacherResource, before: pl.DataFrame) -> dict:
    statuses = dict(table.group_by("status").len().sort("status").iter_rows()) if table.height else {}
    examples = (
        before.select("sample_id", pl.col("instruction").alias("before_instruction"), pl.col("output").alias("before"))
        .join(table.filter(pl.col("status") == "ok"), on="sample_id")
        .select("sample_id", "variant", "before_instruction", "instruction", "before", "output")
        .head(3)
    )
    cost = 0.0
    if teacher.cost_per_1k_input or teacher.cost_per_1k_output:
        cost = (
            stats["prompt_tokens"] / 1000 * teacher.cost_per_1k_input
            + stats["completion_tokens"] / 1000 * teacher.cost_per_1k_output
        )
    return {
        "row_count": table.height,
        **teacher.describe(),
        "prompts_file": prompts_file(teacher) or "(built-in full prompts)",
        "calls_made": stats["calls"],
        "cache_hits": stats["cache_hits"],
        "model_loaded": stats["model_loaded"],
        "failures_by_kind": MetadataValue.json(stats["failures"]),
        "outcomes": MetadataValue.json(statuses),
        "tokens_in": stats["prompt_tokens"],
        "tokens_out": stats["completion_tokens"],
        "estimated_cost": round(cost, 4),
        "examples": MetadataValue.md(markdown_table(examples, max_chars=120)),
    }


def candidate_checks(table: pl.DataFrame, expected: pl.DataFrame, max_failure_ratio: float) -> list[CheckOutcome]:
    failed = int((table["status"] != "ok").sum())
    keys = ["sample_id", "variant"]
    missing = expected.select(keys).join(table.select(keys), on=keys, how="anti").height
    duplicated = table.height - table.select(keys).unique().height
    return [
        ratio_check("parse_failure_ratio_below_bound", failed, max(table.height, 1), max_failure_ratio, "failed-row"),
        CheckOutcome(
            "one_candidate_per_input",
            missing == 0 and duplicated == 0 and table.height == expected.height,
            "exactly one candidate row per input row",
            {"missing": missing, "duplicated": duplicated, "rows": table.height, "expected": expected.height},
        ),
    ]


def build_reflection_assets(layout: Partitioning):
    common = {"partitions_def": layout.rows, "group_name": "teacher", "kinds": {"polars"}, **GPU_STEP}

    @asset(
        **common,
        check_specs=[AssetCheckSpec(n, asset="instruction_candidates", blocking=True) for n in CANDIDATE_CHECKS],
    )
    def instruction_candidates(
        context: AssetExecutionContext,
        config: ReflectionConfig,
        raw_samples: pl.DataFrame,
        teacher: TeacherResource,
        gpu: GPUResource,
        storage: StorageResource,
    ):
        """Variant Q: the teacher's new instruction x1 and its answer y1 for every raw sample."""
        rows = original_variants(layout.shard_rows(context.partition_key, raw_samples))
        table, stats = run_reflection(
            context, rows, "instruction", ["Q"] * rows.height, teacher, gpu, storage, config.chunk_size
        )
        metadata = candidate_metadata(table, stats, teacher, rows) | layout.shard_metadata(context.partition_key)
        yield Output(table, metadata=metadata)
        expected = rows.with_columns(pl.lit("Q").alias("variant"))
        yield from to_check_results(
            "instruction_candidates", candidate_checks(table, expected, config.max_failure_ratio)
        )

    @asset(
        **common,
        check_specs=[AssetCheckSpec(n, asset="response_candidates", blocking=True) for n in CANDIDATE_CHECKS],
    )
    def response_candidates(
        context: AssetExecutionContext,
        config: ReflectionConfig,
        raw_samples: pl.DataFrame,
        instruction_candidates: pl.DataFrame,
        teacher: TeacherResource,
        gpu: GPUResource,
        student: StudentModelResource,
        storage: StorageResource,
    ):
        """Variants A (better answer to x0) and QA (better answer to x1). Eager mode reflects both, as
        the authors do; lazy mode only the branch the student kept (IFD(Q) > IFD(ori) → QA, else A)."""
        ori = original_variants(layout.shard_rows(context.partition_key, raw_samples))
        q = instruction_candidates.select(*VARIANT_SCHEMA)
        if teacher.mode == "lazy":
            ori, q = lazy_branches(context, ori, q, gpu, student, storage)
        rows = pl.concat([ori, q])
        produced = ["A"] * ori.height + ["QA"] * q.height
        table, stats = run_reflection(context, rows, "response", produced, teacher, gpu, storage, config.chunk_size)
        metadata = candidate_metadata(table, stats, teacher, rows) | layout.shard_metadata(context.partition_key)
        yield Output(table, metadata=metadata | {"teacher_mode": teacher.mode})
        expected = rows.with_columns(pl.Series("variant", produced, dtype=pl.String))
        yield from to_check_results("response_candidates", candidate_checks(table, expected, config.max_failure_ratio))

    return [instruction_candidates, response_candidates]


def lazy_branches(context, ori: pl.DataFrame, q: pl.DataFrame, gpu, student, storage):
    """Phase-1 student choice for lazy mode. The losses land in the shared cache, so
    ``student_scores`` later reuses them instead of computing them again."""
    variants = pl.concat([ori, q])
    results, *_ = score_variants(context, variants, gpu, student, storage)
    ifd = {(sid, var): r.ifd for sid, var, r in zip(variants["sample_id"], variants["variant"], results, strict=True)}
    take_q = {
        sid for sid in ori["sample_id"]
        if ifd.get((sid, "Q")) is not None and ifd.get((sid, "ori")) is not None and ifd[(sid, "Q")] > ifd[(sid, "ori")]
    }  # fmt: skip
    return ori.filter(~pl.col("sample_id").is_in(take_q)), q.filter(pl.col("sample_id").is_in(take_q))

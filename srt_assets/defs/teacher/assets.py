"""Stages 2 and 4: the teacher's instruction reflection (``new_instructions``, variant Q) and response
reflection (``better_responses``, variants A and QA), every call cached."""

import time
from dataclasses import dataclass

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field, field_validator

from srt_assets.core.candidate_quality import DEFAULT_SEVERITY, FLAGS, Candidate, candidate_flags
from srt_assets.core.from_files import file_outcomes, load_reflections
from srt_assets.core.generation import CachedGenerator, CallStats
from srt_assets.core.ifd import ScoringItem
from srt_assets.core.progress import BlockProgress
from srt_assets.core.quality import CheckOutcome, ratio_check
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.selection import answers_to_reflect
from srt_assets.core.sources import SourceSpec
from srt_assets.core.teacher import ReflectionOutcome, ReflectionSettings, reflect, reflection_calls
from srt_assets.core.templates import merged_instruction
from srt_assets.core.variants import VARIANT_SCHEMA, original_variants
from srt_assets.defs.common import (
    GPU_STEP,
    blocking_checks,
    calls_progress,
    column_schema,
    json_value,
    production_figures,
    to_check_results,
)
from srt_assets.defs.partitions import ROWS
from srt_assets.defs.report_parts import ReportPart
from srt_assets.partitions import Partitioning
from srt_assets.plots import markdown_table
from srt_assets.report import Section
from srt_assets.resources import (
    ChatModelResource,
    ComputeResource,
    SourceCatalogResource,
    StorageResource,
    StudentModelResource,
)

CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    **VARIANT_SCHEMA,
    "status": pl.String(),
    "error": pl.String(),
    "raw_text": pl.String(),
    "cache_key": pl.String(),
    "attempts": pl.Int64(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "finish_reason": pl.String(),
    "quality_flags": pl.List(pl.String()),
    "rejecting_flags": pl.List(pl.String()),
}
CANDIDATE_COLUMNS = {
    "status": "ok | parse_failed | call_failed | missing (not in the source's reflection files); the texts fall "
    "back to the original where not ok",
    "error": "why the row is not ok",
    "raw_text": "the teacher's reply as the parser saw it",
    "cache_key": "the call's key in the model-call cache, or file#row=N for candidates read from files (and in "
    "selected_dataset's provenance)",
    "attempts": "requests sent for this row: parse retries, HTTP retries and failover included",
    "finish_reason": "how the teacher's reply ended: stop, or length (out of tokens)",
    "quality_flags": "what is wrong with the rewrite (core/candidate_quality.py), for ok rows",
    "rejecting_flags": "the flags set to 'reject': the selection treats the candidate as a failed reflection",
}
CANDIDATE_CHECKS = {
    "failure_ratio_below_bound": "the share of rows that are not ok is at most max_failure_ratio",
    "one_candidate_per_input": "exactly one candidate row per input row",
}


class ReflectionConfig(Config):
    max_failure_ratio: float = Field(
        0.1,
        description="the check fails above this share of rows that are not ok (parse or call failures); the demo "
        "raises it for the bundled 135M teacher, which breaks the markers often",
    )
    chunk_size: int = Field(32, description="calls handed to the backend at once (local batches, progress)")
    flag_severity: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_SEVERITY),
        description="per quality flag: reject (the selection treats the candidate as a failed reflection), warn "
        f"(recorded only) or off (not checked). Flags: {', '.join(FLAGS)}",
    )

    @field_validator("flag_severity")
    @classmethod
    def _known_flags(cls, value: dict[str, str]) -> dict[str, str]:
        for name, severity in value.items():
            if name not in FLAGS:
                raise ValueError(f"unknown quality flag '{name}'; flags: {', '.join(FLAGS)}")
            if severity not in ("reject", "warn", "off"):
                raise ValueError(f"flag '{name}': severity must be reject, warn or off, not '{severity}'")
        return {**DEFAULT_SEVERITY, **value}


REFLECTION_BLOCK_ROWS = 4096  # rows whose prompts are sent (and replies held) at once


@dataclass(frozen=True)
class TeacherModels:
    """The resources a teacher call needs, passed on as one."""

    teacher: ChatModelResource
    gpu: ComputeResource
    storage: StorageResource


def run_reflection(
    context: AssetExecutionContext,
    rows: pl.DataFrame,
    kind: str,
    produced_variants: list[str],
    models: TeacherModels,
    chunk_size: int,
    severity: dict[str, str],
) -> tuple[pl.DataFrame, CallStats, bool]:
    """Reflect ``rows`` (variant-schema rows): candidate rows, call statistics, whether a model loaded.
    The rows go a block at a time: prompts and replies exist for one block, whose candidates become
    columns at once, so memory follows the block, not the source."""
    prompts, settings = models.teacher.reflection_settings()
    blocks = BlockProgress(calls_progress(context, f"teacher ({kind})", unit="rows"), rows.height)
    frames = []
    with models.teacher.session(models.gpu, models.storage, None, chunk_size) as cached:
        if cached.submits_ahead:
            submitted = submit_blocks(cached, rows, kind, prompts, settings)
            context.log.info(f"teacher ({kind}): {submitted} calls queued at the provider before the first wait")
        for start in range(0, rows.height, REFLECTION_BLOCK_ROWS):
            block = rows.slice(start, REFLECTION_BLOCK_ROWS)
            cached.progress = blocks.for_block(start, block.height)
            outcomes = reflect(cached, block.select("instruction", "input", "output").rows(), kind, prompts, settings)
            variants = produced_variants[start : start + block.height]
            frames.append(candidates_frame(block, outcomes, kind, variants, severity))
            blocks.block_done(start, block.height)
    table = pl.concat(frames) if frames else candidates_frame(rows, [], kind, [], severity)
    return table, cached.stats, cached.backend.was_loaded


def submit_blocks(
    cached: CachedGenerator, rows: pl.DataFrame, kind: str, prompts: ReflectionPrompts, settings: ReflectionSettings
) -> int:
    """Queue every block's first-attempt calls at a backend that runs them later (the Batch API)
    before the stage waits on the first block, so the provider works on all of them at once rather
    than one block after another. Only one block's prompts exist at a time."""
    submitted = 0
    for start in range(0, rows.height, REFLECTION_BLOCK_ROWS):
        block = rows.slice(start, REFLECTION_BLOCK_ROWS).select("instruction", "input", "output").rows()
        submitted += cached.submit_ahead(*reflection_calls(block, kind, prompts, settings))
    return submitted


def candidates_frame(
    rows: pl.DataFrame,
    outcomes: list[ReflectionOutcome],
    kind: str,
    produced_variants: list[str],
    severity: dict[str, str] | None = None,
) -> pl.DataFrame:
    severity = severity or DEFAULT_SEVERITY
    records = []
    for row, outcome, variant in zip(rows.iter_rows(named=True), outcomes, produced_variants, strict=True):
        # Instruction reflection writes a self-contained instruction (no separate input); its
        # fallback is the original pair, input merged as in docs/method.md "Records".
        instruction = outcome.instruction if kind == "instruction" else row["instruction"]
        input_text = "" if kind == "instruction" and outcome.status == "ok" else row["input"]
        flags = []
        if outcome.status == "ok":
            source = merged_instruction(row["instruction"], row["input"])
            candidate = Candidate(
                variant, instruction, outcome.answer, source, row["output"], outcome.finish_reason, outcome.closed,
                input_text,
            )  # fmt: skip
            flags = candidate_flags(candidate, severity)
        records.append(
            {
                "sample_id": row["sample_id"],
                "variant": variant,
                "instruction": instruction,
                "input": input_text,
                "output": outcome.answer,
                "status": outcome.status,
                "error": outcome.error,
                "raw_text": outcome.raw_text,
                "cache_key": outcome.cache_key,
                "attempts": outcome.attempts,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "finish_reason": outcome.finish_reason,
                "quality_flags": flags,
                "rejecting_flags": [name for name in flags if severity.get(name) == "reject"],
            }
        )
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def flag_metadata(table: pl.DataFrame) -> dict:
    """How many candidates raise each flag, and a few of them to look at."""
    counts = dict.fromkeys(FLAGS, 0)
    counts.update(
        dict(table.select(pl.col("quality_flags").explode()).drop_nulls().group_by("quality_flags").len().iter_rows())
    )
    flagged = table.filter(pl.col("quality_flags").list.len() > 0)
    examples = flagged.select(
        "sample_id", "variant", pl.col("quality_flags").list.join(", ").alias("flags"), "instruction", "output"
    ).head(4)
    return {
        "flagged_rows": flagged.height,
        "rejected_by_flags": int((table["rejecting_flags"].list.len() > 0).sum()),
        # a backend that reports no finish reason leaves `cut_off` blind for these
        "replies_without_finish_reason": table.filter(
            (pl.col("status") == "ok") & pl.col("finish_reason").is_null()
        ).height,
        "flags": json_value(counts),
        "flagged_examples": MetadataValue.md(markdown_table(examples, max_chars=100)),
    }


def teacher_metadata(
    context: AssetExecutionContext,
    asset: str,
    teacher: ChatModelResource,
    stats: CallStats,
    model_loaded: bool,
    seconds: float,
) -> dict:
    """Who wrote the candidates, what it cost and how fast it went."""
    figures = {"teacher_seconds": round(seconds, 1), "calls_per_second": round(stats.calls / max(seconds, 1e-9), 2)}
    return {
        "teacher": json_value(teacher.describe()),
        "prompts_file": teacher.prompts_path() or "(built-in full prompts)",
        "calls_made": stats.calls,
        "requests_sent": stats.requests,
        "cache_hits": stats.cache_hits,
        "model_loaded": model_loaded,
        "failures_by_kind": json_value(stats.failures),
        "tokens_in": stats.prompt_tokens,
        "tokens_out": stats.completion_tokens,
        "estimated_cost": round(teacher.estimated_cost(stats.prompt_tokens, stats.completion_tokens), 4),
        **production_figures(context, asset, stats.calls > 0, figures),
    }


def candidate_metadata(table: pl.DataFrame, origin: dict, before: pl.DataFrame) -> dict:
    """What a person reads on the materialization: outcomes, where the candidates came from, flags,
    examples."""
    statuses = dict(table.group_by("status").len().sort("status").iter_rows()) if table.height else {}
    examples = (
        before.select("sample_id", pl.col("instruction").alias("before_instruction"), pl.col("output").alias("before"))
        .join(table.filter(pl.col("status") == "ok"), on="sample_id")
        .select("sample_id", "variant", "before_instruction", "instruction", "before", "output")
        .head(3)
    )
    return {
        "ok_rows": statuses.get("ok", 0),
        "outcomes": json_value(statuses),
        **origin,
        **flag_metadata(table),
        "examples": MetadataValue.md(markdown_table(examples, max_chars=120)),
    }


def candidate_checks(table: pl.DataFrame, expected: pl.DataFrame, max_failure_ratio: float) -> list[CheckOutcome]:
    failed = int((table["status"] != "ok").sum())
    keys = ["sample_id", "variant"]
    missing = expected.select(keys).join(table.select(keys), on=keys, how="anti").height
    duplicated = table.height - table.select(keys).unique().height
    return [
        ratio_check("failure_ratio_below_bound", failed, max(table.height, 1), max_failure_ratio, "failed-row"),
        CheckOutcome(
            "one_candidate_per_input",
            missing == 0 and duplicated == 0 and table.height == expected.height,
            "exactly one candidate row per input row",
            {"missing": missing, "duplicated": duplicated, "rows": table.height, "expected": expected.height},
        ),
    ]


@dataclass(frozen=True)
class CandidateStep:
    """One run of a candidates asset: what its report helpers share."""

    context: AssetExecutionContext
    config: ReflectionConfig
    asset_name: str
    kind: str  # the reflection it makes: "instruction" or "response"
    layout: Partitioning

    def report(self, table: pl.DataFrame, rows: pl.DataFrame, produced: list[str], origin: dict):
        """The candidates table with its metadata, then its blocking checks."""
        shard = self.layout.shard_metadata(self.context.partition_key)
        yield Output(table, metadata=candidate_metadata(table, origin, rows) | shard)
        expected = rows.select("sample_id").with_columns(pl.Series("variant", produced, dtype=pl.String))
        yield from to_check_results(self.asset_name, candidate_checks(table, expected, self.config.max_failure_ratio))

    def reflect(self, rows: pl.DataFrame, produced: list[str], models: TeacherModels, extra: dict | None = None):
        """Ask the teacher for ``rows`` (its calls cached) and report the candidates."""
        started = time.perf_counter()
        table, stats, loaded = run_reflection(
            self.context, rows, self.kind, produced, models, self.config.chunk_size, self.config.flag_severity
        )
        seconds = time.perf_counter() - started
        origin = teacher_metadata(self.context, self.asset_name, models.teacher, stats, loaded, seconds)
        yield from self.report(table, rows, produced, origin | (extra or {}))

    def read(self, parts: list[tuple[str, pl.DataFrame, list]], spec: SourceSpec):
        """Candidates from the source's reflection files: (variant, rows, outcomes) per declared file."""
        severity = self.config.flag_severity
        tables = [
            candidates_frame(rows, outcomes, self.kind, [variant] * rows.height, severity)
            for variant, rows, outcomes in parts
        ]
        rows = pl.concat([rows for _, rows, _ in parts]) if parts else pl.DataFrame(schema=VARIANT_SCHEMA)
        produced = [variant for variant, part, _ in parts for _ in range(part.height)]
        origin = {
            "candidates_from": json_value({variant: str(spec.reflections[variant].path) for variant, _, _ in parts}),
            "calls_made": 0,
            "model_loaded": False,
        }
        table = pl.concat(tables) if tables else pl.DataFrame(schema=CANDIDATE_SCHEMA)
        yield from self.report(table, rows, produced, origin)


def candidates_asset(name: str, description: str):
    """The decorator of a candidates asset: per row partition, in the gpu pool, blocking checks."""
    return asset(
        name=name,
        description=description,
        partitions_def=ROWS,
        group_name="teacher",
        kinds={"polars"},
        metadata={"dagster/column_schema": column_schema(CANDIDATE_SCHEMA, CANDIDATE_COLUMNS)},
        check_specs=blocking_checks(name, CANDIDATE_CHECKS, ROWS),
        **GPU_STEP,
    )


@candidates_asset(
    "new_instructions",
    "Variant Q: the teacher's new instruction x1 and its answer y1 for every raw sample, with the call's "
    "status, raw reply and cache key (or, for a source with reflection files, the file and row).",
)
def new_instructions(
    context: AssetExecutionContext,
    config: ReflectionConfig,
    raw_samples: pl.DataFrame,
    teacher: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    layout, raw, spec = sources.row_partition(context.partition_key, raw_samples)
    step = CandidateStep(context, config, "new_instructions", "instruction", layout)
    rows = original_variants(raw)
    if spec.reflections:
        files = load_reflections(spec)
        yield from step.read([("Q", rows, file_outcomes(files["Q"], raw, "instruction"))] if "Q" in files else [], spec)
        return
    yield from step.reflect(rows, ["Q"] * rows.height, TeacherModels(teacher, gpu, storage))


@candidates_asset(
    "better_responses",
    "Variants A (a better answer to the original instruction x0) and QA (a better answer to the new "
    "instruction x1). Eager mode reflects both, as the authors do; lazy mode only the branch the student "
    "kept (IFD(Q) > IFD(ori) → QA, else A; A too where a quality flag rejects Q). A source with reflection "
    "files reads both from them.",
)
def better_responses(
    context: AssetExecutionContext,
    config: ReflectionConfig,
    raw_samples: pl.DataFrame,
    new_instructions: pl.DataFrame,
    teacher: ChatModelResource,
    gpu: ComputeResource,
    student: StudentModelResource,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    layout, raw, spec = sources.row_partition(context.partition_key, raw_samples)
    step = CandidateStep(context, config, "better_responses", "response", layout)
    ori = original_variants(raw)
    q = new_instructions.select(*VARIANT_SCHEMA)
    if spec.reflections:
        yield from step.read(file_answers(spec, raw, ori, q, new_instructions), spec)
        return
    if teacher.mode == "lazy":
        rejected = new_instructions.filter(pl.col("rejecting_flags").list.len() > 0)["sample_id"]
        ori, q = lazy_branches(ori, q, set(rejected), gpu, student, storage)
    produced = ["A"] * ori.height + ["QA"] * q.height
    models = TeacherModels(teacher, gpu, storage)
    yield from step.reflect(pl.concat([ori, q]), produced, models, {"teacher_mode": teacher.mode})


def file_answers(
    spec: SourceSpec, raw: pl.DataFrame, ori: pl.DataFrame, q: pl.DataFrame, new_instructions: pl.DataFrame
) -> list[tuple[str, pl.DataFrame, list]]:
    """The A and QA answers a source's reflection files hold. A QA answer belongs to its new
    instruction: where the Q row is missing (not ok), so is the QA row."""
    files = load_reflections(spec)
    parts = [("A", ori, file_outcomes(files["A"], raw, "response"))] if "A" in files else []
    if "QA" in files:
        q_rows = new_instructions.join(raw.select("sample_id", "row_index"), on="sample_id", maintain_order="left")
        usable = (q_rows["status"] == "ok").to_list()
        parts.append(("QA", q, file_outcomes(files["QA"], q_rows, "response", usable)))
    return parts


def lazy_branches(
    ori: pl.DataFrame,
    q: pl.DataFrame,
    q_rejected: set[str],
    gpu: ComputeResource,
    student: StudentModelResource,
    storage: StorageResource,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Phase-1 student choice for lazy mode (``answers_to_reflect``): the original and the new
    instruction to reflect answers to. The losses land in the shared cache, so ``student_scores``
    later reuses them instead of computing them again."""

    variants = pl.concat([ori, q])
    items = [ScoringItem(r["instruction"], r["input"], r["output"]) for r in variants.iter_rows(named=True)]
    with student.session(gpu, storage) as session:
        results, _ = session.score(items)
    ifd = {(sid, var): r.ifd for sid, var, r in zip(variants["sample_id"], variants["variant"], results, strict=True)}
    wanted = {
        sid: answers_to_reflect(ifd.get((sid, "ori")), ifd.get((sid, "Q")), sid in q_rejected)
        for sid in ori["sample_id"]
    }
    return (
        ori.filter(pl.col("sample_id").is_in([sid for sid, kinds in wanted.items() if "A" in kinds])),
        q.filter(pl.col("sample_id").is_in([sid for sid, kinds in wanted.items() if "QA" in kinds])),
    )


def quality_section(*candidates: pl.DataFrame) -> Section:
    """Teacher rewrites per variant: usable, parse or call failures, and each quality flag raised."""
    table = pl.concat([c.select("variant", "status", "quality_flags") for c in candidates])
    rows = []
    for variant in sorted(table["variant"].unique()):
        part = table.filter(pl.col("variant") == variant)
        ok = part.filter(pl.col("status") == "ok")
        flagged = ok.filter(pl.col("quality_flags").list.len() > 0)
        counts = dict(flagged.select(pl.col("quality_flags").explode()).group_by("quality_flags").len().iter_rows())
        rows.append(
            {"variant": variant, "rows": part.height, "ok": ok.height, "ok_and_unflagged": ok.height - flagged.height}
            | {name: counts.get(name, 0) for name in FLAGS}
        )
    return Section(
        "Teacher rewrites and their quality flags",
        "Per variant: rows, replies that parsed, and those that also raised no quality flag; then how many "
        "candidates raised each flag (core/candidate_quality.py). A candidate with a rejecting flag is a "
        "failed reflection for the selection.",
        pl.DataFrame(rows),
    )


REPORT_PARTS = [
    ReportPart(
        "Teacher rewrites and their quality flags",
        ("new_instructions", "better_responses"),
        lambda i: [quality_section(i.tables["new_instructions"], i.tables["better_responses"])],
    )
]

"""Stages 2 and 4: the teacher's instruction reflection (``new_instructions``, variant Q) and response
reflection (``better_responses``, variants A and QA), every call cached."""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field, field_validator

from srt_assets.core.candidate_quality import DEFAULT_SEVERITY, FLAGS, Candidate, candidate_flags
from srt_assets.core.files import ParquetBlockWriter, StagedParquet, blocks, discarded_on_failure, row_count
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
    production_figures,
    table_value,
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
# What each reflection makes of the variant rows it reads: instruction reflection turns the original
# (ori) into Q; response reflection answers the original instruction (A) and the new one (QA).
PRODUCES = {"instruction": {"ori": "Q"}, "response": {"ori": "A", "Q": "QA"}}
CANDIDATE_KEYS = ["sample_id", "variant"]


def produced_variant(kind: str) -> pl.Expr:
    """The variant a reflection of ``kind`` makes of each row's variant (``PRODUCES``), as a column."""
    return pl.col("variant").replace_strict(PRODUCES[kind], return_dtype=pl.String)


@dataclass(frozen=True)
class TeacherModels:
    """The resources a teacher call needs, passed on as one."""

    teacher: ChatModelResource
    gpu: ComputeResource
    storage: StorageResource


@dataclass
class CandidateTally:
    """The one-candidate-per-input counts, summed block by block as the candidates are written, so
    the check needs neither table whole."""

    expected: int = 0
    missing: int = 0
    duplicated: int = 0

    def add(self, rows: pl.DataFrame, candidates: pl.DataFrame, kind: str) -> None:
        expected = rows.select("sample_id", produced_variant(kind))
        self.expected += expected.height
        self.missing += expected.join(candidates.select(CANDIDATE_KEYS), on=CANDIDATE_KEYS, how="anti").height
        self.duplicated += candidates.height - candidates.select(CANDIDATE_KEYS).unique().height


def row_blocks(rows: pl.DataFrame | pl.LazyFrame) -> Iterator[pl.DataFrame]:
    """The rows a block at a time, read as they are needed (a scanned input is never held whole)."""
    yield from blocks(rows.lazy(), REFLECTION_BLOCK_ROWS)


def run_reflection(
    context: AssetExecutionContext,
    rows: pl.DataFrame | pl.LazyFrame,
    kind: str,
    models: TeacherModels,
    config: ReflectionConfig,
    writer: ParquetBlockWriter,
) -> tuple[CallStats, bool, CandidateTally]:
    """Reflect ``rows`` (variant-schema rows) into ``writer``: call statistics, whether a model
    loaded, the check's counts. The rows go a block at a time: prompts, replies and candidates exist
    for one block, which is written as a row group at once, so memory follows the block, not the
    source."""
    prompts, settings = models.teacher.reflection_settings()
    total = row_count(rows)
    block_progress = BlockProgress(calls_progress(context, f"teacher ({kind})", unit="rows"), total)
    tally = CandidateTally()
    with models.teacher.session(models.gpu, models.storage, None, config.chunk_size) as cached:
        if cached.submits_ahead:
            submitted = submit_blocks(cached, rows, kind, prompts, settings)
            context.log.info(f"teacher ({kind}): {submitted} calls queued at the provider before the first wait")
        start = 0
        for block in row_blocks(rows):
            cached.progress = block_progress.for_block(start, block.height)
            outcomes = reflect(cached, block.select("instruction", "input", "output").rows(), kind, prompts, settings)
            candidates = candidates_frame(block, outcomes, kind, config.flag_severity)
            tally.add(block, candidates, kind)
            writer.write(candidates)
            block_progress.block_done(start, block.height)
            start += block.height
    return cached.stats, cached.backend.was_loaded, tally


def submit_blocks(
    cached: CachedGenerator,
    rows: pl.DataFrame | pl.LazyFrame,
    kind: str,
    prompts: ReflectionPrompts,
    settings: ReflectionSettings,
) -> int:
    """Queue every block's first-attempt calls at a backend that runs them later (the Batch API)
    before the stage waits on the first block, so the provider works on all of them at once rather
    than one block after another. Only one block's prompts exist at a time."""
    submitted = 0
    for block in row_blocks(rows):
        submitted += cached.submit_ahead(
            *reflection_calls(block.select("instruction", "input", "output").rows(), kind, prompts, settings)
        )
    return submitted


def candidates_frame(
    rows: pl.DataFrame, outcomes: list[ReflectionOutcome], kind: str, severity: dict[str, str] | None = None
) -> pl.DataFrame:
    """The candidate rows for ``rows`` (variant-schema rows) and the teacher's outcome for each."""
    severity = severity or DEFAULT_SEVERITY
    produced = PRODUCES[kind]
    records = []
    for row, outcome in zip(rows.iter_rows(named=True), outcomes, strict=True):
        variant = produced[row["variant"]]
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


def flag_metadata(table: pl.LazyFrame) -> dict:
    """How many candidates raise each flag, and a few of them to look at (from the written table,
    a few columns at a time)."""
    counts = dict.fromkeys(FLAGS, 0)
    exploded = table.select(pl.col("quality_flags").explode()).drop_nulls().group_by("quality_flags").len()
    counts.update(dict(exploded.collect().iter_rows()))
    flagged = table.filter(pl.col("quality_flags").list.len() > 0)
    examples = (
        flagged.select(
            "sample_id", "variant", pl.col("quality_flags").list.join(", ").alias("flags"), "instruction", "output"
        )
        .head(4)
        .collect()
    )
    figures = table.select(
        (pl.col("quality_flags").list.len() > 0).sum().alias("flagged_rows"),
        (pl.col("rejecting_flags").list.len() > 0).sum().alias("rejected_by_flags"),
        # a backend that reports no finish reason leaves `cut_off` blind for these
        ((pl.col("status") == "ok") & pl.col("finish_reason").is_null()).sum().alias("replies_without_finish_reason"),
    ).collect()
    return {
        **{name: int(value) for name, value in figures.row(0, named=True).items()},
        "flags": table_value(counts, "flag", "candidates", "no flags"),
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
        "teacher": table_value(teacher.describe()),
        "prompts_file": teacher.prompts_path() or "(built-in full prompts)",
        "calls_made": stats.calls,
        "requests_sent": stats.requests,
        "cache_hits": stats.cache_hits,
        "model_loaded": model_loaded,
        "failures_by_kind": table_value(stats.failures, "kind", "calls", "no failures"),
        "tokens_in": stats.prompt_tokens,
        "tokens_out": stats.completion_tokens,
        "estimated_cost": round(teacher.estimated_cost(stats.prompt_tokens, stats.completion_tokens), 4),
        **production_figures(context, asset, stats.calls > 0, figures),
    }


def candidate_metadata(table: pl.LazyFrame, origin: dict, before: pl.LazyFrame, kind: str) -> dict:
    """What a person reads on the materialization: outcomes, where the candidates came from, flags,
    examples (each beside the row it rewrote)."""
    statuses = dict(table.group_by("status").len().sort("status").collect().iter_rows())
    rewrites = table.filter(pl.col("status") == "ok").select("sample_id", "variant", "instruction", "output")
    rewrites = rewrites.head(3).collect()
    originals = (
        before.filter(pl.col("sample_id").is_in(rewrites["sample_id"].implode()))
        .select(
            "sample_id",
            produced_variant(kind),
            pl.col("instruction").alias("before_instruction"),
            pl.col("output").alias("before"),
        )
        .collect()
    )
    examples = rewrites.join(originals, on=CANDIDATE_KEYS, maintain_order="left").select(
        "sample_id", "variant", "before_instruction", "instruction", "before", "output"
    )
    return {
        "ok_rows": statuses.get("ok", 0),
        "outcomes": table_value(statuses, "status", "rows"),
        **origin,
        **flag_metadata(table),
        "examples": MetadataValue.md(markdown_table(examples, max_chars=120)),
    }


def candidate_checks(table: pl.LazyFrame, tally: CandidateTally, max_failure_ratio: float) -> list[CheckOutcome]:
    """The blocking checks, on the written table (its rows and failures) and the blocks' tally."""
    rows, failed = table.select(pl.len(), (pl.col("status") != "ok").sum()).collect().row(0)
    return [
        ratio_check("failure_ratio_below_bound", failed, max(rows, 1), max_failure_ratio, "failed-row"),
        CheckOutcome(
            "one_candidate_per_input",
            tally.missing == 0 and tally.duplicated == 0 and rows == tally.expected,
            "exactly one candidate row per input row",
            {"missing": tally.missing, "duplicated": tally.duplicated, "rows": rows, "expected": tally.expected},
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
    storage: StorageResource

    def writer(self) -> ParquetBlockWriter:
        return self.storage.table_writer(self.asset_name, self.context.partition_key, CANDIDATE_SCHEMA)

    def report(self, staged: StagedParquet, before: pl.DataFrame | pl.LazyFrame, tally: CandidateTally, origin: dict):
        """The written candidates with their metadata, then their blocking checks (both read from the
        staged file before it is moved into place)."""
        table = staged.scan()
        with discarded_on_failure(staged):  # the calls are in the cache, not lost
            metadata = candidate_metadata(table, origin, before.lazy(), self.kind)
            outcomes = candidate_checks(table, tally, self.config.max_failure_ratio)
        yield Output(staged, metadata=metadata | self.layout.shard_metadata(self.context.partition_key))
        yield from to_check_results(self.asset_name, outcomes)

    def reflect(self, rows: pl.DataFrame | pl.LazyFrame, models: TeacherModels, extra: dict | None = None):
        """Ask the teacher for ``rows`` (its calls cached) and report the candidates."""
        started = time.perf_counter()
        with self.writer() as writer:
            stats, loaded, tally = run_reflection(self.context, rows, self.kind, models, self.config, writer)
            staged = writer.finish()
        seconds = time.perf_counter() - started
        origin = teacher_metadata(self.context, self.asset_name, models.teacher, stats, loaded, seconds)
        yield from self.report(staged, rows, tally, origin | (extra or {}))

    def read(self, parts: list[tuple[pl.DataFrame, list]], spec: SourceSpec):
        """Candidates from the source's reflection files: (rows, outcomes) per declared file."""
        tally = CandidateTally()
        with self.writer() as writer:
            for rows, outcomes in parts:
                candidates = candidates_frame(rows, outcomes, self.kind, self.config.flag_severity)
                tally.add(rows, candidates, self.kind)
                writer.write(candidates)
            staged = writer.finish()
        rows = pl.concat([rows for rows, _ in parts]) if parts else pl.DataFrame(schema=VARIANT_SCHEMA)
        made = sorted({PRODUCES[self.kind][variant] for variant in rows["variant"].unique()})
        origin = {
            "candidates_from": table_value({v: str(spec.reflections[v].path) for v in made}, "variant", "file"),
            "calls_made": 0,
            "model_loaded": False,
        }
        yield from self.report(staged, rows, tally, origin)


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
    raw_samples: pl.LazyFrame,
    teacher: ChatModelResource,
    gpu: ComputeResource,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    layout, raw, spec = sources.row_partition(context.partition_key, raw_samples)
    step = CandidateStep(context, config, "new_instructions", "instruction", layout, storage)
    rows = original_variants(raw)
    if spec.reflections:
        files, raw = load_reflections(spec), raw.lazy().collect()
        parts = [(original_variants(raw), file_outcomes(files["Q"], raw, "instruction"))] if "Q" in files else []
        yield from step.read(parts, spec)
        return
    yield from step.reflect(rows, TeacherModels(teacher, gpu, storage))


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
    raw_samples: pl.LazyFrame,
    new_instructions: pl.LazyFrame,
    teacher: ChatModelResource,
    gpu: ComputeResource,
    student: StudentModelResource,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    layout, raw, spec = sources.row_partition(context.partition_key, raw_samples)
    step = CandidateStep(context, config, "better_responses", "response", layout, storage)
    ori, q = original_variants(raw), new_instructions.select(*VARIANT_SCHEMA)
    if spec.reflections:
        raw, new_instructions = raw.lazy().collect(), new_instructions.lazy().collect()
        yield from step.read(file_answers(spec, raw, ori.lazy().collect(), q.lazy().collect(), new_instructions), spec)
        return
    if teacher.mode == "lazy":  # the student's phase-1 choice needs every row's scores
        rejected = new_instructions.filter(pl.col("rejecting_flags").list.len() > 0).select("sample_id")
        q_rejected = set(rejected.lazy().collect()["sample_id"])
        ori, q = lazy_branches(ori.lazy().collect(), q.lazy().collect(), q_rejected, gpu, student, storage)
    models = TeacherModels(teacher, gpu, storage)
    yield from step.reflect(pl.concat([ori.lazy(), q.lazy()]), models, {"teacher_mode": teacher.mode})


def file_answers(
    spec: SourceSpec, raw: pl.DataFrame, ori: pl.DataFrame, q: pl.DataFrame, new_instructions: pl.DataFrame
) -> list[tuple[pl.DataFrame, list]]:
    """The A and QA answers a source's reflection files hold. A QA answer belongs to its new
    instruction: where the Q row is missing (not ok), so is the QA row."""
    files = load_reflections(spec)
    parts = [(ori, file_outcomes(files["A"], raw, "response"))] if "A" in files else []
    if "QA" in files:
        q_rows = new_instructions.join(raw.select("sample_id", "row_index"), on="sample_id", maintain_order="left")
        usable = (q_rows["status"] == "ok").to_list()
        parts.append((q, file_outcomes(files["QA"], q_rows, "response", usable)))
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

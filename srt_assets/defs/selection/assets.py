"""Stage 6: the student's selection, the datasets it produces, and the baselines they are compared with."""

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

import srt_assets
from srt_assets.core.agreement import AGREEMENT_COLUMNS, AGREEMENT_SCHEMA, decision_agreement, rank_agreement
from srt_assets.core.datasets import (
    POSITION,
    TRAINING_COLUMNS,
    TRAINING_SCHEMA,
    CardFacts,
    chosen_rows_by_position,
    export_dataset,
    original_training_rows,
    random_baseline,
    teacher_rows_by_position,
    write_in_raw_order,
)
from srt_assets.core.files import ParquetBlockWriter, StagedParquet, discarded_on_failure, row_count
from srt_assets.core.from_files import load_statistics
from srt_assets.core.ifd import score_schema
from srt_assets.core.provenance import PROVENANCE_COLUMNS, PROVENANCE_SCHEMA, provenance_columns
from srt_assets.core.quality import CheckOutcome
from srt_assets.core.selection import (
    BRANCHES,
    DECISION_COLUMNS,
    DECISION_SCHEMA,
    SelectionRule,
    branch_counts,
    flag_table,
    recorded_rule,
    sample_facts,
    select,
    unavailable_table,
    write_decisions,
)
from srt_assets.core.sources import SourceSpec
from srt_assets.core.variants import all_variants, variant_rows
from srt_assets.defs.common import (
    blocking_checks,
    column_schema,
    quantiles,
    table_value,
    to_check_results,
)
from srt_assets.defs.partitions import SOURCES
from srt_assets.plots import full_rows_markdown, mapping_table, markdown_table, preview_markdown, text_histogram
from srt_assets.resources import ChatModelResource, SourceCatalogResource, StorageResource, StudentModelResource

DECISION_CHECKS = {"one_decision_per_raw_sample": "exactly one decision record per raw sample"}
SELECTED_CHECKS = {
    "traces_to_one_raw_row": "every selected row has exactly one raw row with its sample_id",
    "unique_sample_id": "no sample is selected twice",
    "size_within_bounds": "the selected size is within [min_rows, max_rows]",
    "scores_satisfy_filters": "every selected row has IFD and r-IFD below the thresholds its decision used",
}
SELECTED_SCHEMA = {**TRAINING_SCHEMA, **{k: v for k, v in PROVENANCE_SCHEMA.items() if k != "sample_id"}}
SELECTED_COLUMNS = {**TRAINING_COLUMNS, **PROVENANCE_COLUMNS}


class SelectionConfig(Config, SelectionRule):
    """The selection rule (docs/method.md, "Selection"); the defaults reproduce the paper's sets."""


class SelectedDatasetConfig(Config):
    min_rows: int = Field(1, description="fail the size check below this many selected rows")
    max_rows: int | None = Field(None, description="fail the size check above this many rows")


class RandomBaselineConfig(Config):
    seed: int = Field(42, description="fixed seed of the draw, so the baseline is reproducible")


def decision_examples(decisions: pl.DataFrame, variants: pl.LazyFrame, accepted: bool) -> str:
    """A few rewrites the student accepted (or rejected), original next to reflected text."""
    branch_filter = pl.col("selected") if accepted else (~pl.col("selected"))
    picked = decisions.filter(branch_filter).head(3).select("sample_id", "branch", "reason")
    texts = variants.filter(pl.col("sample_id").is_in(picked["sample_id"].implode())).collect()
    original = texts.filter(pl.col("variant") == "ori").select(
        "sample_id", pl.col("instruction").alias("original_instruction"), pl.col("output").alias("original_output")
    )
    reflected = texts.filter(pl.col("variant") == "QA").select(
        "sample_id", pl.col("instruction").alias("reflected_instruction"), pl.col("output").alias("reflected_output")
    )
    table = picked.join(original, on="sample_id", how="left").join(reflected, on="sample_id", how="left")
    return markdown_table(table, max_chars=100)


def excluded_candidates(
    raw_samples: pl.LazyFrame, new_instructions: pl.LazyFrame, better_responses: pl.LazyFrame
) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.LazyFrame]:
    """The four variants, the rejecting quality flags and the candidates that are none (failed
    reflections, copies), as queries over the inputs: what every use of the rule needs besides the
    scores."""
    variants = all_variants(raw_samples, new_instructions, better_responses)
    unavailable = unavailable_table(raw_samples, new_instructions, better_responses)
    return variants, flag_table(new_instructions, better_responses), unavailable


def branch_table(counts: dict[str, int]) -> str:
    rows = {"branch": list(BRANCHES), "meaning": list(BRANCHES.values()), "samples": [counts[b] for b in BRANCHES]}
    return markdown_table(pl.DataFrame(rows))


def failed_reflections(*candidates: pl.LazyFrame) -> pl.LazyFrame:
    """The teacher rows whose reflection failed (status not ok) and why, in sample order."""
    columns = ("sample_id", "variant", "status", "error", "attempts")
    names = [table.collect_schema().names() for table in candidates]
    parts = [
        table.filter(pl.col("status") != "ok").select(c for c in columns if c in present)
        for table, present in zip(candidates, names, strict=True)
        if "status" in present
    ]
    return pl.concat(parts, how="diagonal_relaxed").sort("sample_id", "variant") if parts else pl.LazyFrame()


def decisions_preview(head: pl.DataFrame, rows: int) -> str:
    """The first decisions (``head`` of ``rows``) with their reasons whole, then each of them as a
    whole row with every score and threshold the rule compared, and its explain_sample config."""
    shown = head.select("sample_id", "branch", "chosen_variant", "selected", "reason", "unavailable")
    scores = [c for c in head.columns if c.startswith(("ifd_", "rifd_", "chosen_")) and c not in shown.columns]
    whole = head.select(*shown.columns, *scores)
    return preview_markdown(shown, rows, max_chars=1000) + "\n\n" + full_rows_markdown(whole)


def decision_metadata(
    config: SelectionConfig, decisions: pl.LazyFrame, variants: pl.LazyFrame, *candidates: pl.LazyFrame
) -> dict:
    """What a person auditing the selection reads first, as tables: branches, candidates that were
    none and why, score distributions, examples; the exact values stay in the table. Read from the
    written decisions a few columns at a time (numbers and flags: ~50 bytes a sample)."""
    summary = decisions.select(
        "branch", "kept", "selected", "ifd_ori", "rifd_ori", "chosen_ifd", "chosen_rifd", pl.col("flags").is_not_null()
    ).collect()
    counts = branch_counts(summary)
    chosen = summary.filter(pl.col("selected"))
    failures = failed_reflections(*candidates)
    failure_count = row_count(failures) if failures.collect_schema() else 0
    distributions = {
        "IFD, original rows": quantiles(summary["ifd_ori"]),
        "r-IFD, original rows": quantiles(summary["rifd_ori"]),
        "IFD, selected rows": quantiles(chosen["chosen_ifd"]),
        "r-IFD, selected rows": quantiles(chosen["chosen_rifd"]),
    }
    reasons = decisions.select(pl.col("unavailable").str.split("; ")).explode("unavailable").drop_nulls()
    not_candidates = dict(reasons.group_by("unavailable").len().sort("unavailable").collect().iter_rows())
    head = decisions.head(5).collect()
    examples = (
        decisions.filter(pl.col("selected"))
        .head(3)
        .collect()
        .vstack(decisions.filter(~pl.col("selected")).head(3).collect())
    )
    return {
        "kept": counts["kept"],
        "selected": counts["selected"],
        "branches": MetadataValue.md(branch_table(counts)),
        "not_candidates": MetadataValue.md(mapping_table(not_candidates, "variant: why", "samples")),
        "failed_reflections": MetadataValue.md(preview_markdown(failures.head(20).collect(), failure_count, 200)),
        "samples_with_flags": int(summary["flags"].sum()),
        "scores": MetadataValue.md(mapping_table(distributions, "scores")),
        "ifd_original_rows": MetadataValue.md(text_histogram(summary["ifd_ori"].to_list(), "IFD, original rows")),
        "ifd_selected_rows": MetadataValue.md(text_histogram(chosen["chosen_ifd"].to_list(), "IFD, selected rows")),
        "decisions_preview": MetadataValue.md(decisions_preview(head, summary.height)),
        "accepted_examples": MetadataValue.md(decision_examples(examples, variants, accepted=True)),
        "rejected_examples": MetadataValue.md(decision_examples(examples, variants, accepted=False)),
        "rule": MetadataValue.md(mapping_table(config.model_dump(include=set(SelectionRule.model_fields)), "setting")),
    }


SELECTED_METHOD = (
    "Selective Reflection-Tuning (Li et al., 2024): a teacher model rewrote each instruction (variant Q) and "
    "each answer (A, and QA for the new instruction); the student's IFD and reverse IFD chose per sample which "
    'of the four variants to keep (docs/method.md, "Selection"), and samples the rule rejected are left out. '
    "`decision_reason` says why each row was kept."
)
FULL_METHOD = "Every original row of the source, unchanged: the baseline trained on everything."
TEACHER_METHOD = (
    "Reflection-Tuning without selection: every sample's most rewritten candidate from the teacher (QA, else A, "
    "else Q; the original text where the teacher's reflection failed or copied its source), the baseline that "
    "shows what the student's choice adds."
)
RANDOM_METHOD = (
    "Original rows drawn without replacement with a fixed seed, as many as the selection kept: the baseline "
    "that separates better data from less data."
)


def export_metadata(
    rows: pl.LazyFrame,
    storage: StorageResource,
    name: str,
    context: AssetExecutionContext,
    facts: CardFacts,
) -> dict:
    """Write the exports (with their dataset card) and name them as metadata paths."""
    written = export_dataset(rows, storage.exports_dir / name / context.partition_key, name, facts)
    return {key: MetadataValue.path(str(path)) for key, path in written.items()}


TRAINING_BLOCK_ROWS = 16_384  # training rows (or raw positions) written at once


def staged_training_set(
    context: AssetExecutionContext, storage: StorageResource, name: str, rows: pl.LazyFrame, schema: dict
) -> StagedParquet:
    """A training set's rows (a query over scans) written a block at a time to a staged file, in raw
    order: rows that carry their raw POSITION (gathered from the candidates) are put back in order."""

    def writers(columns: dict) -> ParquetBlockWriter:
        return storage.table_writer(name, context.partition_key, columns)

    if POSITION in rows.collect_schema().names():
        return write_in_raw_order(rows, writers, schema, TRAINING_BLOCK_ROWS)
    with writers(schema) as writer:
        return writer.write_query(rows, TRAINING_BLOCK_ROWS)


def per_variant_table(rows: pl.LazyFrame) -> MetadataValue:
    per_variant = dict(rows.group_by("variant").len().sort("variant").collect().iter_rows())
    return MetadataValue.md(mapping_table(per_variant, "variant", "rows"))


def card_facts(
    context: AssetExecutionContext,
    sources: SourceCatalogResource,
    method: str,
    source_rows: int,
    settings: dict | None = None,
) -> CardFacts:
    """The card's facts for this partition: the catalog's source and licence, the run, the method."""
    spec = sources.source(context.partition_key)
    return CardFacts(
        source=spec.name,
        method=method,
        source_description=spec.description,
        license=spec.license,
        hub_id=spec.hub_id,
        source_rows=source_rows,
        settings=settings or {},
        columns=SELECTED_COLUMNS,
        run_id=context.run_id,
        version=srt_assets.__version__,
    )


def candidate_origin(spec: SourceSpec, teacher: ChatModelResource) -> dict:
    """Who made the candidates: the teacher, or (a source with reflection files) those files."""
    if spec.reflections:
        return {"candidates_from": {variant: str(file.path) for variant, file in spec.reflections.items()}}
    return {"teacher": teacher.describe()}


def selection_settings(
    spec: SourceSpec, teacher: ChatModelResource, student: StudentModelResource, rule: SelectionRule
) -> dict:
    """What made the selected set: the candidates' origin, the student and the rule with its thresholds."""
    return {
        **candidate_origin(spec, teacher),
        "student": {"model": student.model, "template": student.template, "max_length": student.max_length},
        **{f"rule.{name}": value for name, value in rule.model_dump().items()},
    }


def training_set_metadata(rows: StagedParquet, source_rows: int) -> dict:
    """What every training set shows: its share of the source, a preview that says how much of the set
    it shows, and the previewed rows whole with their explain_sample configs."""
    head = rows.scan().head(5).collect()
    return {
        "share_of_raw": round(rows.rows / max(source_rows, 1), 4),
        "rows_per_variant": per_variant_table(rows.scan()),
        "preview": MetadataValue.md(preview_markdown(head, rows.rows)),
        "preview_rows_whole": MetadataValue.md(full_rows_markdown(head)),
    }


def selected_checks(
    selected: StagedParquet, raw_samples: pl.LazyFrame, config: SelectedDatasetConfig
) -> list[CheckOutcome]:
    rows, table, raw_ids = selected.rows, selected.scan(), raw_samples.select("sample_id")
    untraced = row_count(table.join(raw_ids, on="sample_id", how="anti"))
    matches = row_count(table.select("sample_id").join(raw_ids, on="sample_id", how="left"))
    duplicates = rows - table.select(pl.col("sample_id").n_unique()).collect().item()
    too_small = rows < config.min_rows
    too_large = config.max_rows is not None and rows > config.max_rows
    violating = row_count(
        table.filter(
            pl.col("ifd").is_null()
            | pl.col("rifd").is_null()
            | (pl.col("ifd") >= pl.col("ifd_threshold"))
            | (pl.col("rifd") >= pl.col("rifd_threshold"))
        )
    )
    bounds = f"[{config.min_rows}, {config.max_rows if config.max_rows is not None else '∞'}]"
    return [
        CheckOutcome(
            "traces_to_one_raw_row",
            untraced == 0 and matches == rows,
            SELECTED_CHECKS["traces_to_one_raw_row"],
            {"untraced_rows": untraced, "join_rows": matches, "rows": rows},
        ),
        CheckOutcome(
            "unique_sample_id", duplicates == 0, SELECTED_CHECKS["unique_sample_id"], {"duplicated_rows": duplicates}
        ),
        CheckOutcome(
            "size_within_bounds",
            not (too_small or too_large),
            f"selected size within {bounds}",
            {"rows": rows, "min_rows": config.min_rows, "max_rows": config.max_rows},
        ),
        CheckOutcome(
            "scores_satisfy_filters",
            violating == 0,
            SELECTED_CHECKS["scores_satisfy_filters"],
            {"violating_rows": violating},
        ),
    ]


def agreement_markdown(table: pl.DataFrame) -> str:
    rounded = table.with_columns(pl.col("spearman", "kendall").round(3))
    return markdown_table(rounded)


SELECTION_ASSET = {"partitions_def": SOURCES, "group_name": "selection", "kinds": {"polars"}}
TRAINING_TABLE = {"dagster/column_schema": column_schema(TRAINING_SCHEMA, TRAINING_COLUMNS)}


@asset(
    **SELECTION_ASSET,
    metadata={"dagster/column_schema": column_schema(DECISION_SCHEMA, DECISION_COLUMNS)},
    check_specs=blocking_checks("sample_decisions", DECISION_CHECKS, SOURCES),
)
def sample_decisions(
    context: AssetExecutionContext,
    config: SelectionConfig,
    raw_samples: pl.LazyFrame,
    new_instructions: pl.LazyFrame,
    better_responses: pl.LazyFrame,
    student_scores: pl.LazyFrame,
    storage: StorageResource,
):
    """One decision record per raw sample: the branch the student took, the scores it compared,
    the chosen variant (or none) and why, and whether the top-k stage selected it. The inputs are
    scans: the rule reads scores, statuses and text hashes, a block of samples at a time."""
    raw, inst, resp, scores = (
        table.lazy() for table in (raw_samples, new_instructions, better_responses, student_scores)
    )
    variants, flags, unavailable = excluded_candidates(raw, inst, resp)
    staged = write_decisions(
        sample_facts(raw, scores, flags, unavailable),
        config,
        lambda: storage.table_writer("sample_decisions", context.partition_key, DECISION_SCHEMA),
    )
    with discarded_on_failure(staged):
        decisions = staged.scan()
        metadata = decision_metadata(config, decisions, variants, inst, resp)
        raw_rows = row_count(raw)
        distinct = decisions.select(pl.col("sample_id").n_unique()).collect().item()
        outcome = CheckOutcome(
            "one_decision_per_raw_sample",
            staged.rows == raw_rows and distinct == raw_rows,
            DECISION_CHECKS["one_decision_per_raw_sample"],
            {"rows": staged.rows, "raw_rows": raw_rows},
        )
        context.log.info(f"selection: {metadata['kept']} kept, {metadata['selected']} selected of {raw_rows}")
        yield Output(staged, metadata=metadata)
    yield from to_check_results("sample_decisions", [outcome])


@asset(**SELECTION_ASSET, metadata={"dagster/column_schema": column_schema(AGREEMENT_SCHEMA, AGREEMENT_COLUMNS)})
def score_agreement(
    context: AssetExecutionContext,
    raw_samples: pl.DataFrame,
    new_instructions: pl.DataFrame,
    better_responses: pl.DataFrame,
    student_scores: pl.DataFrame,
    sample_decisions: pl.DataFrame,
    sources: SourceCatalogResource,
):
    """Our student against statistics made elsewhere (the source's `statistics` files, e.g. the
    authors' Llama-2-7B): Spearman and Kendall per statistic and variant, and the decisions each
    leads to under the same rule. Empty for a source that declares no statistics."""
    spec = sources.source(context.partition_key)
    if spec.statistics is None:
        note = f"source '{spec.name}' declares no statistics files (sources.yaml: statistics), nothing to compare"
        return Output(pl.DataFrame(schema=AGREEMENT_SCHEMA), metadata={"note": note})
    variants, flags, unavailable = (
        query.collect()
        for query in excluded_candidates(raw_samples.lazy(), new_instructions.lazy(), better_responses.lazy())
    )
    wanted = variants.join(raw_samples.select("sample_id", "row_index"), on="sample_id", maintain_order="left")
    theirs = load_statistics(spec, wanted, score_schema())
    table = rank_agreement(student_scores, theirs)
    rule = recorded_rule(sample_decisions) or SelectionRule()
    their_decisions = select(raw_samples["sample_id"].to_list(), theirs, rule, flags, unavailable)
    summary = decision_agreement(sample_decisions, their_decisions)
    label = spec.statistics.label or "their statistics"
    context.log.info(f"selection: ours {summary['selected_ours']}, {label} {summary['selected_theirs']}")
    return Output(
        table,
        metadata={
            "theirs": label,
            "statistics_use": spec.statistics.use,
            "rule": table_value({name: getattr(rule, name) for name in SelectionRule.model_fields}),
            **{name: value for name, value in summary.items() if value is not None},
            "their_branches": MetadataValue.md(branch_table(branch_counts(their_decisions))),
            "correlations": MetadataValue.md(agreement_markdown(table)),
        },
    )


@asset(
    **SELECTION_ASSET,
    metadata={"dagster/column_schema": column_schema(SELECTED_SCHEMA, SELECTED_COLUMNS)},
    check_specs=blocking_checks("selected_dataset", SELECTED_CHECKS, SOURCES),
)
def selected_dataset(
    context: AssetExecutionContext,
    config: SelectedDatasetConfig,
    raw_samples: pl.LazyFrame,
    new_instructions: pl.LazyFrame,
    better_responses: pl.LazyFrame,
    sample_decisions: pl.LazyFrame,
    sources: SourceCatalogResource,
    storage: StorageResource,
    teacher: ChatModelResource,
    student: StudentModelResource,
):
    """The student-selected recycled data in the training schema, each row with its provenance:
    source file and row, the teacher calls behind it, and the scores that chose it."""
    raw, inst, resp, decisions = (t.lazy() for t in (raw_samples, new_instructions, better_responses, sample_decisions))
    spec = sources.source(context.partition_key)
    rows = chosen_rows_by_position(raw, variant_rows(raw, inst, resp), decisions).join(
        provenance_columns(decisions, inst, resp, str(spec.path)), on="sample_id", how="left", maintain_order="left"
    )
    selected = staged_training_set(context, storage, "selected_dataset", rows, SELECTED_SCHEMA)
    with discarded_on_failure(selected):
        source_rows = row_count(raw)
        settings = selection_settings(spec, teacher, student, recorded_rule(decisions) or SelectionRule())
        facts = card_facts(context, sources, SELECTED_METHOD, source_rows, settings)
        metadata = {
            **training_set_metadata(selected, source_rows),
            **export_metadata(selected.scan(), storage, "selected_dataset", context, facts),
        }
        outcomes = selected_checks(selected, raw, config)
        yield Output(selected, metadata=metadata)
    yield from to_check_results("selected_dataset", outcomes)


def training_set_output(
    context: AssetExecutionContext,
    storage: StorageResource,
    name: str,
    rows: pl.LazyFrame,
    facts: CardFacts,
    **extra: MetadataValue | str,
) -> Output:
    """A baseline's rows written a block at a time, with the metadata and exports every set has."""
    staged = staged_training_set(context, storage, name, rows, TRAINING_SCHEMA)
    with discarded_on_failure(staged):
        metadata = {**training_set_metadata(staged, facts.source_rows or 0), **extra}
        metadata |= export_metadata(staged.scan(), storage, name, context, facts)
        return Output(staged, metadata=metadata)


@asset(**SELECTION_ASSET, metadata=TRAINING_TABLE)
def baseline_full(
    context: AssetExecutionContext,
    raw_samples: pl.LazyFrame,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    """The full original data in the training schema: the "trained on everything" baseline."""
    raw = raw_samples.lazy()
    facts = card_facts(context, sources, FULL_METHOD, row_count(raw))
    return training_set_output(context, storage, "baseline_full", original_training_rows(raw), facts)


@asset(**SELECTION_ASSET, metadata=TRAINING_TABLE)
def baseline_random(
    context: AssetExecutionContext,
    config: RandomBaselineConfig,
    raw_samples: pl.LazyFrame,
    selected_dataset: pl.LazyFrame,
    storage: StorageResource,
    sources: SourceCatalogResource,
):
    """As many original rows as the selection kept, drawn with a fixed seed: the fair baseline
    that separates "better data" from "less data"."""
    raw = raw_samples.lazy()
    size = row_count(selected_dataset.lazy())
    settings = {"seed": config.seed, "rows": min(size, row_count(raw))}
    facts = card_facts(context, sources, RANDOM_METHOD, row_count(raw), settings)
    rows = random_baseline(original_training_rows(raw), size, config.seed)
    return training_set_output(context, storage, "baseline_random", rows, facts, seed=str(config.seed))


@asset(**SELECTION_ASSET, metadata=TRAINING_TABLE)
def baseline_teacher(
    context: AssetExecutionContext,
    raw_samples: pl.LazyFrame,
    new_instructions: pl.LazyFrame,
    better_responses: pl.LazyFrame,
    storage: StorageResource,
    sources: SourceCatalogResource,
    teacher: ChatModelResource,
):
    """All the teacher's rewrites, one per sample, without the student's choice: the paper's
    Reflection-Tuning baseline, which the selected set has to beat for selection to matter."""
    raw, inst, resp = (t.lazy() for t in (raw_samples, new_instructions, better_responses))
    rows = teacher_rows_by_position(raw, variant_rows(raw, inst, resp), unavailable_table(raw, inst, resp))
    origin = candidate_origin(sources.source(context.partition_key), teacher)
    facts = card_facts(context, sources, TEACHER_METHOD, row_count(raw), origin)
    return training_set_output(context, storage, "baseline_teacher", rows, facts)

"""Row-level audit without leaving the UI: the ``explain_sample`` job takes a ``sample_id`` in the
launchpad and its run shows the sample's whole story (raw row, teacher calls with their raw text,
the four variants' scores, the decision, and which training sets hold it), as ``srt explain`` does."""

from pathlib import Path

import polars as pl
from dagster import Config, MetadataValue, OpExecutionContext, Output, job, op
from pydantic import Field

from srt_assets.core import provenance
from srt_assets.plots import markdown_table
from srt_assets.resources import SourceCatalogResource, StorageResource

STORY_COLUMNS = {
    "raw_samples": ["row_index", "instruction", "input", "output"],
    "new_instructions": ["variant", "status", "error", "instruction", "output", "raw_text", "attempts", "cache_key"],
    "better_responses": ["variant", "status", "error", "instruction", "output", "raw_text", "attempts", "cache_key"],
    "student_scores": ["variant", "ifd", "rifd", "ppl_A_direct", "ppl_A_condition", "ppl_Q_direct", "ppl_Q_condition",
                       "null_reason"],
    "sample_decisions": ["branch", "chosen_variant", "kept", "selected", "reason", "unavailable", "flags", "ifd_rank"],
}  # fmt: skip


class ExplainSampleConfig(Config):
    sample_id: str = Field(
        description="the id to explain, e.g. demo-0123456789abcdef: a column of every table; the previews of "
        "raw_samples, sample_decisions and the training sets give each previewed row's config ready to paste"
    )


@op(description="Tell the story of one sample from the stored tables of its source.")
def explain_sample_op(
    context: OpExecutionContext,
    config: ExplainSampleConfig,
    storage: StorageResource,
    sources: SourceCatalogResource,
) -> Output[None]:
    try:
        story = provenance.sample_story(
            config.sample_id, Path(storage.base_dir), sources.catalog.names, sources.catalog.shards
        )
    except provenance.SampleNotFound as error:
        known = provenance.some_sample_ids(Path(storage.base_dir), sources.catalog.names)
        hint = f"; ids that exist: {', '.join(known)}" if known else "; no raw_samples are materialized yet"
        raise provenance.SampleNotFound(f"explain_sample: {error}{hint}") from None
    source = story["source"]
    context.log.info(provenance.format_story(story))
    metadata: dict = {"source": source}
    for name, columns in STORY_COLUMNS.items():
        rows = story.get(name) or []
        frame = pl.DataFrame(rows).select([c for c in columns if rows and c in rows[0]]) if rows else pl.DataFrame()
        metadata[name] = MetadataValue.md(markdown_table(frame, max_chars=400))
    metadata["in_selected_dataset"] = story["in_selected_dataset"]
    metadata["in_baseline_random"] = story.get("in_baseline_random", False)
    # the full baseline holds every raw sample, once it is materialized
    metadata["in_baseline_full"] = (Path(storage.base_dir) / "baseline_full" / f"{source}.parquet").is_file()
    return Output(None, metadata=metadata)


@job(description="Explain one sample: give its sample_id in the launchpad (ops: explain_sample_op: config).")
def explain_sample():
    explain_sample_op()

"""The student's selection (docs/method.md, "Selection"): one auditable decision per raw sample.

Phase 1 compares IFD(Q) with IFD(ori); phase 2 compares r-IFD of the reflected answer with its
source on the branch phase 1 took; then both scores of the candidate must be below 1. Comparisons
are strict, as the authors': a tie or a missing score rejects the reflection. A candidate whose
reflection failed (its text fell back to its source) or that copies another variant is no candidate,
and its decision says so. An optional second
stage keeps the top k (or top p%) of the kept samples by IFD, following Cherry LLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl
from pydantic import BaseModel, Field, model_validator

from srt_assets.core.files import ParquetBlockWriter, StagedParquet, blocks
from srt_assets.core.variants import VARIANTS, FrameT, variant_rows

# The four branches the authors count, named by the candidate each one leads to.
BRANCHES = {
    "QA": "new instruction accepted, reflected answer accepted",
    "Q": "new instruction accepted, reflected answer rejected",
    "A": "new instruction rejected, reflected answer accepted",
    "ori": "new instruction rejected, reflected answer rejected",
}
REFLECTED = ("QA", "A")
DECISION_BLOCK_ROWS = 16_384  # samples decided (and their records held) at once

DECISION_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "branch": pl.String(),
    "chosen_variant": pl.String(),
    "kept": pl.Boolean(),
    "selected": pl.Boolean(),
    "reason": pl.String(),
    "flags": pl.String(),  # the rejecting quality flags of the sample's candidates, e.g. "QA: repetition"
    "unavailable": pl.String(),  # candidates that are none, e.g. "Q: parse_failed; QA: copy of A"
    **{f"ifd_{v}": pl.Float64() for v in VARIANTS},
    **{f"rifd_{v}": pl.Float64() for v in VARIANTS},
    "chosen_ifd": pl.Float64(),
    "chosen_rifd": pl.Float64(),
    "ifd_rank": pl.Int64(),
    "ifd_threshold": pl.Float64(),
    "rifd_threshold": pl.Float64(),
    "rule": pl.String(),  # the SelectionRule as JSON (every row): what a comparison decides by
}
DECISION_COLUMNS = {
    "sample_id": "the raw sample decided on",
    "branch": "the branch the rule took: QA, Q, A or ori (the candidate it leads to)",
    "chosen_variant": "the variant kept, or null when the rule kept none",
    "kept": "a variant passed the rule and both filters",
    "selected": "kept and within the optional top-k / top-p% stage",
    "reason": "why, in words: the comparisons made and the candidates that were none",
    "flags": "the rejecting quality flags of the sample's candidates, e.g. 'QA: repetition'",
    "unavailable": "candidates that are none: a failed reflection's status ('Q: parse_failed') or a copy "
    "('QA: copy of A')",
    **{f"ifd_{v}": f"the student's IFD of variant {v} (exact)" for v in VARIANTS},
    **{f"rifd_{v}": f"the student's reverse IFD of variant {v} (exact)" for v in VARIANTS},
    "chosen_ifd": "IFD of the chosen variant",
    "chosen_rifd": "reverse IFD of the chosen variant",
    "ifd_rank": "rank among the kept samples by IFD, highest first",
    "ifd_threshold": "the IFD a candidate had to stay below",
    "rifd_threshold": "the reverse IFD a candidate had to stay below",
    "rule": "the SelectionRule as JSON",
}


class SelectionRule(BaseModel):
    """The knobs of the rule. Defaults reproduce the authors' released selective-recycled sets. The
    ``sample_decisions`` asset's config is this model, so each knob is defined here only."""

    keep_unreflected: bool = Field(
        False, description="also keep Q / ori on the branches where the reflected answer lost (the authors: off)"
    )
    ifd_below: float = Field(1.0, description="keep a candidate only if its IFD is below this")
    rifd_below: float = Field(1.0, description="keep a candidate only if its r-IFD is below this")
    top_k: int | None = Field(None, description="second stage: keep the k kept samples with the highest IFD")
    top_percent: float | None = Field(None, description="second stage: keep the top p% of them by IFD")
    respect_quality_flags: bool = Field(
        True, description="treat a candidate with a rejecting quality flag as a failed reflection (srt's addition)"
    )

    @model_validator(mode="after")
    def _one_top_stage(self) -> SelectionRule:
        if self.top_k is not None and self.top_percent is not None:
            raise ValueError("set at most one of top_k and top_percent")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_percent is not None and not 0 < self.top_percent <= 100:
            raise ValueError(f"top_percent must be in (0, 100], got {self.top_percent}")
        return self


@dataclass(frozen=True)
class Decision:
    branch: str
    chosen_variant: str | None
    reason: str


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _less(a: float | None, b: float | None) -> bool:
    """Strict ``a < b``; unknown scores never win (NaN compares false, as in the authors' code)."""
    return _known(a) and _known(b) and a < b


def _fmt(value: float | None) -> str:
    """A score for people: 4 significant digits (the tables keep it exact)."""
    return f"{value:.4g}" if _known(value) else "missing"


def prefers_new_instruction(ifd_ori: float | None, ifd_q: float | None) -> bool:
    """Phase 1 of the rule: the rewritten instruction wins when it is harder for the student,
    IFD(Q) > IFD(ori) (a missing score or a tie keeps the original)."""
    return _less(ifd_ori, ifd_q)


def answers_to_reflect(ifd_ori: float | None, ifd_q: float | None, q_rejected: bool) -> set[str]:
    """Lazy mode's response reflections for one sample: the branch ``decide`` can still choose. With
    a rejected Q, ``decide`` takes A when the rule respects quality flags and the IFD choice when it
    does not (a selection setting, decided later), so both are reflected."""
    chosen = "QA" if prefers_new_instruction(ifd_ori, ifd_q) else "A"
    return {"A", chosen} if q_rejected else {chosen}


def decide(
    ifd: dict[str, float | None],
    rifd: dict[str, float | None],
    rule: SelectionRule,
    flagged: Mapping[str, Sequence[str]] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> Decision:
    """The decision for one raw sample from its per-variant IFD and r-IFD (missing variants: None).
    A variant in ``flagged`` (variant → its rejecting quality flags) or in ``unavailable`` (variant →
    why it is no candidate, e.g. ``parse_failed`` or ``copy of ori``) is not eligible: the rule runs as
    the authors wrote it on the candidates that are, and the reason names the others for what they are
    (a fallback's scores equal its source's, so a bare comparison would hide the failure)."""
    excluded = {v: f"{v} flagged ({', '.join(flags)}), not eligible" for v, flags in (flagged or {}).items() if flags}
    excluded.update({v: f"{v}: {why} — not a candidate" for v, why in (unavailable or {}).items()})

    if "Q" in excluded:
        instruction, source, reflected = "ori", "ori", "A"
        why = excluded["Q"]
    elif prefers_new_instruction(ifd.get("ori"), ifd.get("Q")):
        instruction, source, reflected = "Q", "Q", "QA"
        why = f"IFD(Q)={_fmt(ifd.get('Q'))} > IFD(ori)={_fmt(ifd.get('ori'))}"
    else:
        instruction, source, reflected = "ori", "ori", "A"
        why = f"IFD(Q)={_fmt(ifd.get('Q'))} not > IFD(ori)={_fmt(ifd.get('ori'))}"
    if reflected in excluded:
        branch = instruction
        why += f"; {excluded[reflected]}"
        if not rule.keep_unreflected:
            return Decision(branch, None, why + "; reflected answer rejected (keep_unreflected is off)")
        why += f"; keep_unreflected: {branch} stands"
    elif _less(rifd.get(reflected), rifd.get(source)):
        branch = reflected
        why += f"; rIFD({reflected})={_fmt(rifd.get(reflected))} < rIFD({source})={_fmt(rifd.get(source))}"
    else:
        branch = instruction
        why += f"; rIFD({reflected})={_fmt(rifd.get(reflected))} not < rIFD({source})={_fmt(rifd.get(source))}"
        if not rule.keep_unreflected:
            return Decision(branch, None, why + "; reflected answer rejected (keep_unreflected is off)")
    candidate_ifd, candidate_rifd = ifd.get(branch), rifd.get(branch)
    if not _less(candidate_rifd, rule.rifd_below):
        return Decision(branch, None, why + f"; rIFD({branch})={_fmt(candidate_rifd)} not < {rule.rifd_below}")
    if not _less(candidate_ifd, rule.ifd_below):
        return Decision(branch, None, why + f"; IFD({branch})={_fmt(candidate_ifd)} not < {rule.ifd_below}")
    return Decision(branch, branch, why + f"; both filters pass: keep {branch}")


FLAG_SCHEMA: dict[str, pl.DataType] = {"sample_id": pl.String(), "variant": pl.String(), "flags": pl.List(pl.String())}
WHY_SCHEMA: dict[str, pl.DataType] = {"sample_id": pl.String(), "variant": pl.String(), "why": pl.String()}


def wide_scores(scores: FrameT) -> FrameT:
    """One row per sample with ``ifd_<variant>`` and ``rifd_<variant>`` columns (null where absent)."""
    base = scores.select("sample_id").unique(maintain_order=True)
    for variant in VARIANTS:
        part = scores.filter(pl.col("variant") == variant).select(
            "sample_id", pl.col("ifd").alias(f"ifd_{variant}"), pl.col("rifd").alias(f"rifd_{variant}")
        )
        base = base.join(part, on="sample_id", how="left", maintain_order="left")
    return base


def flag_table(*candidates: FrameT) -> FrameT:
    """The candidates with rejecting quality flags (FLAG_SCHEMA), in table then row order."""
    parts = [
        table.filter(pl.col("rejecting_flags").list.len() > 0)
        .select("sample_id", "variant", pl.col("rejecting_flags").alias("flags"))
        .cast(FLAG_SCHEMA)
        for table in candidates
    ]
    return pl.concat(parts) if parts else pl.DataFrame(schema=FLAG_SCHEMA)


def _per_sample(table: FrameT, value: str) -> FrameT:
    """sample_id → a list of {variant, <value>} structs, the rows' order kept."""
    return table.group_by("sample_id", maintain_order=True).agg(pl.struct("variant", value).alias(value))


def sample_facts(sample_ids: FrameT, scores: FrameT, flags: FrameT, unavailable: FrameT) -> FrameT:
    """What the rule reads per sample, one row per id of ``sample_ids`` in its order: ``scored``
    (the student scored it), ``ifd_<v>``/``rifd_<v>``, ``flags`` (FLAG_SCHEMA rows as structs) and
    ``unavailable`` (WHY_SCHEMA rows as structs). Lazy frames give a lazy frame that reads only the
    score columns, so the texts never enter memory."""
    wide = wide_scores(scores.select("sample_id", "variant", "ifd", "rifd")).with_columns(scored=pl.lit(True))
    return (
        sample_ids.select("sample_id")
        .join(wide, on="sample_id", how="left", maintain_order="left")
        .join(_per_sample(flags, "flags"), on="sample_id", how="left", maintain_order="left")
        .join(_per_sample(unavailable, "why"), on="sample_id", how="left", maintain_order="left")
        .rename({"why": "unavailable"})
        .with_columns(pl.col("scored").fill_null(False))
    )


def decision_rows(facts: pl.DataFrame, rule: SelectionRule) -> pl.DataFrame:
    """Decision records (DECISION_SCHEMA) for a block of ``sample_facts`` rows, before the top stage
    (``selected`` equals ``kept``, ``ifd_rank`` is null: ``apply_top_stage`` ranks all blocks)."""
    recorded_rule = rule.model_dump_json()
    records = []
    for row in facts.iter_rows(named=True):
        ifd = {v: row[f"ifd_{v}"] for v in VARIANTS}
        rifd = {v: row[f"rifd_{v}"] for v in VARIANTS}
        sample_flags = {item["variant"]: item["flags"] for item in row["flags"] or []}
        missing = {item["variant"]: item["why"] for item in row["unavailable"] or []}
        # flags are recorded either way; they bind when the rule respects them
        decision = decide(ifd, rifd, rule, sample_flags if rule.respect_quality_flags else None, missing)
        reason = decision.reason if row["scored"] else "no student scores for this sample; " + decision.reason
        chosen = decision.chosen_variant
        records.append(
            {
                "sample_id": row["sample_id"],
                "branch": decision.branch,
                "chosen_variant": chosen,
                "kept": chosen is not None,
                "selected": chosen is not None,
                "reason": reason,
                "flags": "; ".join(f"{v}: {', '.join(names)}" for v, names in sample_flags.items()) or None,
                "unavailable": "; ".join(f"{v}: {why}" for v, why in missing.items()) or None,
                **{f"ifd_{v}": ifd[v] for v in VARIANTS},
                **{f"rifd_{v}": rifd[v] for v in VARIANTS},
                "chosen_ifd": ifd[chosen] if chosen else None,
                "chosen_rifd": rifd[chosen] if chosen else None,
                "ifd_rank": None,
                "ifd_threshold": rule.ifd_below,
                "rifd_threshold": rule.rifd_below,
                "rule": recorded_rule,
            }
        )
    return pl.DataFrame(records, schema=DECISION_SCHEMA)


def select(
    sample_ids: list[str],
    scores: pl.DataFrame,
    rule: SelectionRule,
    flags: pl.DataFrame | None = None,
    unavailable: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Decision records (DECISION_SCHEMA) for every sample id, in the given order, held in memory
    (``write_decisions`` is the same rule a block at a time).

    ``scores`` holds (sample_id, variant, ifd, rifd) rows; a sample without scores gets branch ``ori``
    and no choice, with the reason saying so. ``flags`` (FLAG_SCHEMA, ``flag_table``) are the
    rejecting quality flags of candidates: recorded in ``flags`` always, binding when
    ``rule.respect_quality_flags`` is on. ``unavailable`` (WHY_SCHEMA, ``unavailable_table``) says
    why a candidate is none: recorded in ``unavailable`` and always binding.
    """
    facts = sample_facts(
        pl.DataFrame({"sample_id": sample_ids}, schema={"sample_id": pl.String()}),
        scores,
        pl.DataFrame(schema=FLAG_SCHEMA) if flags is None else flags,
        pl.DataFrame(schema=WHY_SCHEMA) if unavailable is None else unavailable,
    )
    return apply_top_stage(decision_rows(facts, rule), rule)


def write_decisions(
    facts: pl.LazyFrame, rule: SelectionRule, writers: Callable[[], ParquetBlockWriter]
) -> StagedParquet:
    """``select`` for a table too large to hold: ``facts`` (``sample_facts`` of scans) is decided a
    block at a time into one staged file, the kept samples are ranked from its few score columns,
    and a second pass marks the top stage into the final staged file. Memory: a block of records
    and a rank (8 bytes) per sample."""
    with writers() as first:
        undecided = first.write_query(facts, DECISION_BLOCK_ROWS, lambda block: decision_rows(block, rule))
    try:
        ranked = undecided.scan().select("sample_id", "kept", "chosen_ifd").collect()
        ranks, limit = top_ranks(ranked, rule)
        del ranked
        with writers() as final:
            offset = 0
            for block in blocks(undecided.scan(), DECISION_BLOCK_ROWS):
                final.write(mark_top(block, ranks.slice(offset, block.height), limit))
                offset += block.height
            return final.finish()
    finally:
        undecided.discard()


def unavailable_table(raw_samples: FrameT, new_instructions: FrameT, better_responses: FrameT) -> FrameT:
    """Why each candidate that is none is none (WHY_SCHEMA, in variant order per sample): the status
    of its reflection where not ``ok`` (its text fell back to its source), else ``copy of <v>`` where
    its texts equal those of an earlier variant (a teacher that returned the text unchanged). Texts
    are compared by their 64-bit hashes, so a scan's query holds eight bytes a variant, never the
    texts (a false "copy" needs a hash collision within one sample: about 1e-19 a pair)."""
    failed = [
        table.filter(pl.col("status") != "ok").select("sample_id", "variant", pl.col("status").alias("why"))
        for table in (new_instructions, better_responses)
        if "status" in table.collect_schema().names()
    ]
    text = pl.concat_str("instruction", "input", "output", separator="\x1f", ignore_nulls=True)
    hashed = variant_rows(raw_samples, new_instructions, better_responses).select(
        "sample_id", "variant", text.hash().alias("text")
    )
    wide = hashed.filter(pl.col("variant") == VARIANTS[0]).select("sample_id", pl.col("text").alias(VARIANTS[0]))
    for variant in VARIANTS[1:]:
        part = hashed.filter(pl.col("variant") == variant).select("sample_id", pl.col("text").alias(variant))
        wide = wide.join(part, on="sample_id", how="left", maintain_order="left")
    copies = []
    for position, variant in enumerate(VARIANTS[1:], start=1):
        why = pl.lit(None, dtype=pl.String())
        for earlier in reversed(VARIANTS[:position]):  # the first earlier match wins
            why = pl.when(pl.col(variant) == pl.col(earlier)).then(pl.lit(f"copy of {earlier}")).otherwise(why)
        copies.append(wide.select("sample_id", pl.lit(variant).alias("variant"), why.alias("why")))
    order = {name: rank for rank, name in enumerate(VARIANTS)}
    return (
        pl.concat([part.cast(WHY_SCHEMA) for part in failed + copies])
        .drop_nulls("why")
        .unique(["sample_id", "variant"], keep="first", maintain_order=True)
        .sort("sample_id", pl.col("variant").replace_strict(order, return_dtype=pl.Int8), maintain_order=True)
    )


def recorded_rule(decisions: pl.DataFrame | pl.LazyFrame) -> SelectionRule | None:
    """The rule a decisions table was made with (its ``rule`` column), None for an empty table."""
    first = decisions.lazy().select("rule").head(1).collect()["rule"]
    return SelectionRule.model_validate_json(first[0]) if len(first) else None


def top_count(kept: int, rule: SelectionRule) -> int:
    if rule.top_k is not None:
        return min(rule.top_k, kept)
    if rule.top_percent is not None:
        return min(kept, math.ceil(kept * rule.top_percent / 100))
    return kept


def top_ranks(decisions: pl.DataFrame, rule: SelectionRule) -> tuple[pl.Series, int]:
    """Each row's rank among the kept samples by IFD (highest first; ties by sample id for a stable
    result; null where not kept), aligned with the rows, and how many of the top are selected."""
    indexed = decisions.select("sample_id", "kept", "chosen_ifd").with_row_index("_row")
    kept = indexed.filter(pl.col("kept")).sort(["chosen_ifd", "sample_id"], descending=[True, False])
    ranked = kept.select("_row", pl.int_range(1, kept.height + 1, dtype=pl.Int64).alias("ifd_rank"))
    ranks = indexed.select("_row").join(ranked, on="_row", how="left", maintain_order="left")["ifd_rank"]
    return ranks, top_count(kept.height, rule)


def mark_top(decisions: pl.DataFrame, ranks: pl.Series, limit: int) -> pl.DataFrame:
    """Record the ranks and select the top ``limit``; the others stay ``kept`` and say why they were
    not selected."""
    rank = pl.col("ifd_rank")
    cut = f"; below the top {limit} by IFD"
    return decisions.with_columns(ranks.alias("ifd_rank")).with_columns(
        (pl.col("kept") & (rank <= limit)).fill_null(False).alias("selected"),
        pl.when(pl.col("kept") & (rank > limit))
        .then(pl.col("reason") + pl.lit(cut))
        .otherwise("reason")
        .alias("reason"),
    )


def apply_top_stage(decisions: pl.DataFrame, rule: SelectionRule) -> pl.DataFrame:
    """Rank the kept samples by IFD and mark the top ``top_count`` as selected (``top_ranks``)."""
    ranks, limit = top_ranks(decisions, rule)
    return mark_top(decisions, ranks, limit)


def branch_counts(decisions: pl.DataFrame) -> dict[str, int]:
    """The authors' four counts (samples per branch), plus kept and selected totals."""
    counts = {branch: 0 for branch in BRANCHES}
    counts.update(dict(decisions.group_by("branch").len().iter_rows()))
    counts["kept"] = int(decisions["kept"].sum())
    counts["selected"] = int(decisions["selected"].sum())
    return counts

"""How far two students agree: rank correlation of their statistics, and of the decisions they lead to.

Used to set one's own student against the authors' released Llama-2 statistics (or any other): the
statistics are compared per variant and over all rows, the decisions per sample.
"""

from __future__ import annotations

import math

import polars as pl

AGREEMENT_SCHEMA: dict[str, pl.DataType] = {
    "statistic": pl.String(),  # ifd | rifd
    "variant": pl.String(),  # ori, Q, A, QA, or all
    "rows": pl.Int64(),  # rows where both have a finite score
    "spearman": pl.Float64(),
    "kendall": pl.Float64(),
}
AGREEMENT_COLUMNS = {
    "statistic": "ifd or rifd",
    "variant": "ori, Q, A, QA, or all of them",
    "rows": "rows where both sides have a finite score",
    "spearman": "Spearman's rank correlation of ours and theirs",
    "kendall": "Kendall's tau-b of ours and theirs",
}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _correlations(ours: list[float], theirs: list[float]) -> tuple[float | None, float | None]:
    """Spearman's rho and Kendall's tau-b (scipy), None where either side is constant or too short."""
    from scipy import stats

    if len(ours) < 3 or len(set(ours)) < 2 or len(set(theirs)) < 2:
        return None, None
    rho = stats.spearmanr(ours, theirs).statistic
    tau = stats.kendalltau(ours, theirs).statistic
    return (float(rho) if math.isfinite(rho) else None), (float(tau) if math.isfinite(tau) else None)


def rank_agreement(ours: pl.DataFrame, theirs: pl.DataFrame) -> pl.DataFrame:
    """Per statistic, per variant and over all rows: how our scores rank the rows against theirs.
    Both frames hold (sample_id, variant, ifd, rifd)."""
    keys = ["sample_id", "variant"]
    joined = ours.select(*keys, "ifd", "rifd").join(
        theirs.select(*keys, pl.col("ifd").alias("their_ifd"), pl.col("rifd").alias("their_rifd")), on=keys
    )
    records = []
    variants = [v for v in ("ori", "Q", "A", "QA") if v in set(joined["variant"])]
    for statistic in ("ifd", "rifd"):
        for variant in [*variants, "all"]:
            part = joined if variant == "all" else joined.filter(pl.col("variant") == variant)
            pairs = [
                (a, b)
                for a, b in zip(part[statistic], part[f"their_{statistic}"], strict=True)
                if _finite(a) and _finite(b)
            ]
            rho, tau = _correlations([a for a, _ in pairs], [b for _, b in pairs])
            records.append(
                {"statistic": statistic, "variant": variant, "rows": len(pairs), "spearman": rho, "kendall": tau}
            )
    return pl.DataFrame(records, schema=AGREEMENT_SCHEMA)


def decision_agreement(ours: pl.DataFrame, theirs: pl.DataFrame) -> dict[str, float | int | None]:
    """Two decision tables (core.selection.DECISION_SCHEMA) over the same samples: how many each
    selects, how many both do, and how often they make the same choice (the chosen variant, or none)."""
    joined = ours.select("sample_id", "selected", "chosen_variant").join(
        theirs.select(
            "sample_id", pl.col("selected").alias("their_selected"), pl.col("chosen_variant").alias("their_choice")
        ),
        on="sample_id",
    )
    both = int((joined["selected"] & joined["their_selected"]).sum())
    ours_only = int((joined["selected"] & ~joined["their_selected"]).sum())
    theirs_only = int((~joined["selected"] & joined["their_selected"]).sum())
    same_choice = int(joined.select(pl.col("chosen_variant").eq_missing(pl.col("their_choice")).sum()).item())
    samples = joined.height
    return {
        "samples": samples,
        "selected_ours": both + ours_only,
        "selected_theirs": both + theirs_only,
        "selected_both": both,
        "selected_ours_only": ours_only,
        "selected_theirs_only": theirs_only,
        "same_choice": same_choice,
        "same_choice_share": same_choice / samples if samples else None,
        "kappa": _kappa(joined["selected"].to_list(), joined["their_selected"].to_list()),
    }


def _kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's kappa of two yes/no selections (agreement beyond what their selection rates explain)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return None if expected == 1 else (observed - expected) / (1 - expected)

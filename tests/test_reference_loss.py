"""The judge-free metric's statistics: paired differences with bootstrap intervals per reference set,
checks that pass only when the whole interval is below zero, and the report's sections."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from srt_assets.core.evaluation import loss_comparisons, loss_differences, paired_interval


def losses_table(shift: dict[str, float], prompts: int = 200, seed: int = 0) -> pl.DataFrame:
    """Per-answer losses of each checkpoint on two reference sets: the baseline's plus ``shift`` and noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for reference_set in ("alpaca_eval", "alpaca_eval_gpt4"):
        base = rng.normal(2.0, 0.4, prompts)
        for dataset, delta in shift.items():
            noisy = base + delta + rng.normal(0, 0.05, prompts)
            rows += [
                {"prompt_set": reference_set, "prompt_id": str(i), "dataset": dataset, "loss": float(v),
                 "base_loss": float(b + 0.3), "tokens": 10}
                for i, (v, b) in enumerate(zip(noisy, base, strict=True))
            ]  # fmt: skip
    return pl.DataFrame(rows)


def test_the_interval_covers_the_true_paired_difference_and_shrinks_with_pairs():
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 0.5, 800)
    b = a + 0.05 + rng.normal(0, 0.1, 800)  # b is worse by 0.05; the spread of a cancels in the pairs
    mean, low, high, pairs = paired_interval(a, b)
    assert pairs == 800 and low < -0.05 < high and high < 0 and mean == pytest.approx(-0.05, abs=0.01)
    _, low_small, high_small, _ = paired_interval(a[:50], b[:50])
    assert high_small - low_small > high - low
    mean, low, high, pairs = paired_interval([1.0, math.nan, 2.0], [1.5, 1.0, math.inf])
    assert pairs == 1 and mean == -0.5 and math.isnan(low) and math.isnan(high)


def test_checks_pass_only_where_the_whole_interval_lies_below_zero():
    table = losses_table({"selected": -0.10, "random": 0.0, "teacher": -0.101, "full": 0.02})
    differences = {(d.reference_set, d.baseline): d for d in loss_differences(table)}
    assert set(differences) == {(s, b) for s in ("alpaca_eval", "alpaca_eval_gpt4")
                                for b in ("random", "teacher", "full", "base")}  # fmt: skip
    assert differences[("alpaca_eval", "random")].high < 0
    assert differences[("alpaca_eval", "teacher")].low < 0 < differences[("alpaca_eval", "teacher")].high
    outcomes = {o.name: o for o in loss_comparisons(list(differences.values()))}
    assert outcomes["selected_beats_random"].passed and outcomes["selected_beats_full"].passed
    assert outcomes["selected_beats_base"].passed  # base is 0.3 worse than the baseline everywhere
    teacher = outcomes["selected_beats_teacher"]
    assert not teacher.passed and "alpaca_eval_gpt4:" in teacher.description and "[" in teacher.description
    assert teacher.metadata["alpaca_eval"]["pairs"] == 200


def test_a_missing_checkpoint_or_no_scorable_answer_fails_the_comparison_and_says_so():
    table = losses_table({"selected": 0.0, "random": 0.0}).with_columns(
        pl.when(pl.col("dataset") == "selected").then(float("nan")).otherwise(pl.col("loss")).alias("loss")
    )
    outcomes = {o.name: o for o in loss_comparisons(loss_differences(table))}
    assert not outcomes["selected_beats_random"].passed
    assert "0 scorable pair(s)" in outcomes["selected_beats_random"].description
    assert "no finite reference losses" in outcomes["selected_beats_full"].description


def test_the_report_shows_differences_and_the_seed_spread(tmp_path):
    from srt_assets.defs.evaluation import report
    from srt_assets.defs.evaluation.reference_losses import difference_sections, seed_spread
    from srt_assets.report import write_report

    table = losses_table({"selected": -0.1, "random": 0.0, "teacher": 0.0, "full": 0.0}, prompts=40)
    seeds = pl.concat(
        [table.filter(pl.col("dataset") == "random").select(pl.lit(draw).alias("draw"), "prompt_set", "prompt_id",
                                                            (pl.col("loss") + shift).alias("loss"))
         for draw, shift in (("baseline_random", 0.0), ("seed 1", 0.02), ("seed 2", -0.02))]
    )  # fmt: skip
    spread = seed_spread(seeds, table)
    row = spread.filter(pl.col("prompt_set") == "alpaca_eval").row(0, named=True)
    assert row["draws"] == 3 and row["random_max"] - row["random_min"] == pytest.approx(0.04, abs=1e-3)
    assert row["selected"] < row["random_min"]
    written = write_report("demo", difference_sections(table), tmp_path / "out")
    text = written.markdown_path.read_text()
    assert "## Selected vs each baseline, with 95% intervals" in text and "| ci95_low | ci95_high |" in text
    assert len(written.results["loss_differences"]) == 8
    titles = [p.title for p in report.REPORT_PARTS]
    assert titles.index("Selected vs each baseline, with 95% intervals") < titles.index(
        "The random baseline over seeds"
    )

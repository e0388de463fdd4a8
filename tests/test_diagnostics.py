"""The student diagnostics (core/diagnostics.py): probes whose truth is known, and the paired AUC
with its interval, on scores made up so the right answer is known."""

import random

from srt_assets.core.diagnostics import REQUIRED, Pair, aucs, build_probes, corrupt, paired_auc, preference

ROWS = [Pair(f"Question {i}?", "", f"Answer {i}. It has two sentences.") for i in range(10)]


def test_probes_pair_every_sampled_row_with_another_row_and_are_reproducible():
    chosen, probes = build_probes(ROWS, count=6, seed=3)
    assert len(chosen) == 6 and chosen == build_probes(ROWS, count=6, seed=3)[0]
    assert {p.kind for p in probes} == {"response_swap", "instruction_swap", "corrupted_response"}
    donors = {}
    for probe in probes:
        assert probe.true == ROWS[chosen[probe.row]]
        if probe.kind == "response_swap":
            donors[probe.row] = probe.fake.output
        if probe.kind == "response_swap":
            assert probe.fake.instruction == probe.true.instruction and probe.fake.output != probe.true.output
        if probe.kind == "instruction_swap":
            assert probe.fake.output == probe.true.output and probe.fake.instruction != probe.true.instruction
    assert len(set(donors.values())) == len(donors) == 6  # each row lends its answer to exactly one other
    assert build_probes(ROWS[:1], count=6, seed=0)[1] == []  # one row: nothing to swap with


def test_corruption_reorders_sentences_or_cuts_a_lone_one():
    rng = random.Random(0)
    text = "First point. Second point! Third point?"
    shuffled = corrupt(text, rng)
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())
    assert corrupt("one two three four", rng) == "one two"
    assert corrupt("Yes. Yes.", rng) != "Yes. Yes."  # repeated sentences: no order differs, so it is cut


def test_no_probe_compares_a_text_with_itself():
    """Duplicated outputs are common (Alpaca has many): a donor with the same text is no worse, so no probe."""
    rows = [Pair(f"Question {i}?", "", "Same answer. Twice over.") for i in range(6)]
    _, probes = build_probes(rows, count=6, seed=0)
    assert probes and all(p.fake != p.true for p in probes)
    assert not [p for p in probes if p.kind == "response_swap"]


def test_paired_auc_is_the_share_of_rows_where_the_truth_scores_lower():
    assert preference(0.5, 0.9) == 1.0 and preference(0.9, 0.5) == 0.0 and preference(0.5, 0.5) == 0.5
    assert preference(None, 0.5) is None and preference(float("nan"), 0.5) is None
    perfect = paired_auc("response_swap", "ifd", [1.0] * 30, seed=0)
    assert perfect.auc == 1.0 and perfect.low == 1.0 and perfect.clearly_above_chance(0.6)
    coin = paired_auc("response_swap", "ifd", [1.0, 0.0] * 15, seed=0)
    assert coin.auc == 0.5 and coin.low < 0.5 < coin.high and not coin.clearly_above_chance(0.6)
    assert paired_auc("x", "ifd", [], seed=0).auc is None


def test_aucs_follow_the_scores_of_each_statistic():
    _, probes = build_probes(ROWS, count=10, seed=1)
    true = [{"ifd": 0.5, "rifd": 0.9} for _ in probes]  # IFD always prefers the truth, r-IFD never does
    fake = [{"ifd": 0.8, "rifd": 0.4} for _ in probes]
    table = {(a.probe, a.statistic): a.auc for a in aucs(probes, true, fake, seed=0)}
    assert all(table[(probe, "ifd")] == 1.0 for probe, _ in REQUIRED)
    assert all(table[(probe, "rifd")] == 0.0 for probe, _ in REQUIRED)

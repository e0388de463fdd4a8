"""Quality flags on teacher rewrites (core/candidate_quality.py) and how the selection uses them: the
ways teachers fail are caught, good rewrites are left alone, and a flagged candidate is a failed
reflection unless the config says otherwise."""

import gzip
import itertools
import json

import polars as pl
import pytest

from srt_assets.core.candidate_quality import FLAGS, Candidate, candidate_flags, rejected
from srt_assets.core.selection import SelectionRule, decide, select

GOOD_ANSWER = "Red, blue and yellow are the primary colors of paint; mixing them gives the other colors."


def answer(output: str, finish: str | None = "stop", source_output: str = "Red.", closed: bool = True) -> Candidate:
    return Candidate("A", "Name the primary colors.", output, "Name the primary colors.", source_output, finish, closed)


def new_instruction(instruction: str, output: str = GOOD_ANSWER) -> Candidate:
    return Candidate("Q", instruction, output, "Name the primary colors.", "Red.", "stop")


@pytest.mark.parametrize(
    ("candidate", "flag"),
    [
        (answer("Red.\n\n[The End of Answer] Blue is one too."), "leaked_markers"),
        (answer("[System]\nRed, blue and yellow."), "leaked_markers"),
        (answer("<|im_start|>assistant\nRed, blue and yellow."), "leaked_markers"),
        (answer("Here is a better answer: red, blue and yellow."), "talks_about_rewrite"),
        (new_instruction("The new instruction is harder than the original one."), "talks_about_rewrite"),
        (answer("Name the primary colors. Red, blue and yellow."), "instruction_in_output"),
        (
            new_instruction(
                "Red, blue and yellow are the primary colors of paint.",
                output="Red, blue and yellow are the primary colors of paint, and mixing them gives the rest.",
            ),
            "answer_as_instruction",
        ),
        (new_instruction("Name the primary colors."), "copy_of_original"),
        (answer("Red.", source_output="Red."), "copy_of_original"),
        (answer("Red, blue and yellow are the primary colors and", finish="length", closed=False), "cut_off"),
        (answer("Москва — столица России и крупнейший город страны."), "language_switch"),
        (
            answer(
                "Le rouge, le bleu et le jaune sont les couleurs primaires, et on les mélange pour faire "
                "les autres couleurs de la peinture.",
                source_output="The primary colors are red, blue and yellow.",
            ),
            "language_switch",
        ),
        (answer("Red is a color.\nRed is a color.\nRed is a color.\nRed is a color."), "repetition"),
    ],
)
def test_each_way_a_teacher_fails_is_flagged(candidate, flag):
    assert flag in candidate_flags(candidate)


@pytest.mark.parametrize(
    "candidate",
    [
        answer(GOOD_ANSWER),
        new_instruction("Explain how mixing two primary colors of paint gives a secondary color, with an example."),
        new_instruction("The following list has a mistake. Find it and correct it: red, green, purple."),
        new_instruction("Your task is to write a short poem about the three primary colors."),
        new_instruction("A haiku about the colors of autumn, with a seasonal word in the first line."),
        new_instruction("What would change if printers used red, green and blue instead of cyan, magenta, yellow?"),
        # a statement that sets a scene is a task when its words are not its answer's
        new_instruction("The essay argues that the meaning of life is subjective."),
        # the answer closed at its marker and the reply rambled on past it: nothing was cut
        answer(GOOD_ANSWER, finish="length", closed=True),
        # markers and role prefixes the source already has are the task's own, not a leak
        Candidate(
            "A",
            "Fix the bug: return array[end] reads past the end.",
            "Use array[end - 1]: the last index is one less than the length.",
            "Fix the bug: return array[end] reads past the end.",
            "Use array[end].",
            "stop",
        ),
        Candidate(
            "QA",
            "Write a short dialogue between a user and an assistant about colors.",
            "User: What are the primary colors?\nAssistant: Red, blue and yellow.",
            "Write a dialogue.",
            "User: Hi.\nAssistant: Hello.",
            "stop",
        ),
        # a long structured answer is not a loop
        answer("\n".join(f"| {color} | primary | paint pigment |" for color in ["red", "blue", "yellow", "red"])),
        Candidate(
            "A",
            "Translate to French: the cat sleeps.",
            "Le chat dort.",
            "Translate to French: the cat sleeps.",
            "Le chat.",
            "stop",
        ),
    ],
)
def test_good_rewrites_raise_no_flag(candidate):
    assert candidate_flags(candidate) == []


def test_the_three_junk_rows_of_the_demo_are_flagged():
    """The rows a user found selected after `make demo` (issue: "Is the data any good?")."""
    same = "The essay argues that the meaning of life is subjective and the definition of life should be " \
        "determined by individual beliefs and experiences."  # fmt: skip
    echo = Candidate("QA", same, f"{same}\n\n[System]\n{same}", same, "An essay about life.", "stop")
    meta = Candidate(
        "QA",
        "I've been following a popular influencer account and checking out their latest product.",
        "The new instruction is completely different from the previous one.\n[System]\nThe answer to the question "
        "is completely different from the previous one.",
        "x",
        "y",
        "stop",
    )
    leak = Candidate(
        "A",
        "Find the weight of the object.",
        "The object has a mass of 5kg and a volume of 0.25L.\n\n[The End of Answer] The object can be calculated "
        "using the formula Weight = Mass × Gravity.",
        "Find the weight of the object.",
        "The object has a mass of 5kg and a volume of 0.25L.",
        "stop",
    )
    assert {"leaked_markers", "instruction_in_output"} <= set(candidate_flags(echo))
    assert {"leaked_markers", "talks_about_rewrite"} <= set(candidate_flags(meta))
    assert "leaked_markers" in candidate_flags(leak)


def test_severity_decides_what_is_checked_and_what_rejects():
    junk = answer("[System] Red.\n\n[The End of Answer]")
    severity = dict.fromkeys(FLAGS, "reject") | {"leaked_markers": "warn", "copy_of_original": "off"}
    flags = candidate_flags(junk, severity)
    assert flags == ["leaked_markers"] and not rejected(flags, severity)
    assert rejected(candidate_flags(junk))  # by default every flag rejects


SCORES = pl.DataFrame(
    {
        "sample_id": ["s"] * 4,
        "variant": ["ori", "Q", "A", "QA"],
        "ifd": [0.5, 0.6, 0.4, 0.7],  # IFD(Q) > IFD(ori): the new instruction is accepted ...
        "rifd": [0.9, 0.8, 0.7, 0.6],  # ... and QA beats Q on r-IFD: the authors' rule keeps QA
    }
)


def test_a_flagged_candidate_is_a_failed_reflection_and_the_reason_says_why():
    ifd = dict(zip(SCORES["variant"], SCORES["ifd"], strict=True))
    rifd = dict(zip(SCORES["variant"], SCORES["rifd"], strict=True))
    assert decide(ifd, rifd, SelectionRule()).chosen_variant == "QA"
    blocked = decide(ifd, rifd, SelectionRule(), {"QA": ["repetition"]})
    assert blocked.chosen_variant is None and "QA flagged (repetition), not eligible" in blocked.reason
    no_q = decide(ifd, rifd, SelectionRule(), {"Q": ["answer_as_instruction"]})
    assert no_q.branch == "A" and no_q.chosen_variant == "A"  # the ori branch: A beats ori on r-IFD
    assert "Q flagged (answer_as_instruction)" in no_q.reason
    kept = decide(ifd, rifd, SelectionRule(keep_unreflected=True), {"QA": ["cut_off"]})
    assert kept.chosen_variant == "Q"


def test_the_flags_can_be_turned_off_for_the_selection():
    flagged = pl.DataFrame({"sample_id": ["s"], "variant": ["QA"], "flags": [["repetition"]]})
    strict = select(["s"], SCORES, SelectionRule(), flagged).row(0, named=True)
    assert strict["selected"] is False and strict["flags"] == "QA: repetition"
    authors = select(["s"], SCORES, SelectionRule(respect_quality_flags=False), flagged).row(0, named=True)
    assert authors["chosen_variant"] == "QA" and authors["flags"] == "QA: repetition"  # still on record


def test_keep_unreflected_keeps_the_original_when_both_rewrites_are_flagged():
    ifd = {"ori": 0.5, "Q": 0.6, "A": 0.4, "QA": 0.7}
    rifd = {"ori": 0.9, "Q": 0.8, "A": 0.7, "QA": 0.6}
    both = {"Q": ["answer_as_instruction"], "A": ["leaked_markers"]}
    kept = decide(ifd, rifd, SelectionRule(keep_unreflected=True), both)
    assert kept.branch == "ori" and kept.chosen_variant == "ori"
    assert "keep_unreflected: ori stands" in kept.reason
    assert decide(ifd, rifd, SelectionRule(), both).chosen_variant is None
    assert decide(ifd, rifd, SelectionRule(), {"QA": []}).chosen_variant == "QA"  # no flags: not flagged


def test_the_flags_stay_quiet_on_real_alpaca_pairs(shared_data):
    """Human-written pairs are what good rewrites look like. Each Alpaca pair, taken as a new task for
    the pair before it (Q) and as an answer to its own instruction (A: copying is what it is, so that
    flag is off), may raise a flag for at most 0.1% of the 52k. adds_markup is off for the unrelated
    pairs (Q): about 0.2% of Alpaca's rows carry image URLs or audio tags (imgur, freesound), exactly
    what that flag is for when a rewrite brings them into a pair that had none."""
    rows = json.loads(gzip.decompress((shared_data / "alpaca_data.json.gz").read_bytes()))
    no_copy_check = dict.fromkeys(FLAGS, "reject") | {"copy_of_original": "off"}
    unrelated = dict.fromkeys(FLAGS, "reject") | {"adds_markup": "off"}
    raised = []
    for before, row in itertools.pairwise(rows):
        shown = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        shown_before = before["instruction"] + (f"\n{before['input']}" if before["input"] else "")
        new_task = Candidate("Q", shown, row["output"], shown_before, before["output"])
        own_answer = Candidate("A", row["instruction"], row["output"], shown, row["output"], input=row["input"])
        if candidate_flags(new_task, unrelated) or candidate_flags(own_answer, no_copy_check):
            raised.append(row["instruction"])
    assert len(rows) > 50_000 and len(raised) <= 0.001 * len(rows), raised[:20]

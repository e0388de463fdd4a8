"""IFD / r-IFD texts and statistics (docs/method.md "Student statistics"), and the engine's exactness."""

import math

import pytest
from conftest import alpaca_rows

from srt_assets.core.ifd import (
    STAT_KEYS,
    ScoringConfig,
    ScoringItem,
    ScoringText,
    TextBuilder,
    combine,
    resolve_context_token,
    score_items,
)
from srt_assets.core.templates import get_template, reverse_instruction
from srt_assets.models.student import build_text_builder


def test_reverse_prompt_and_templates_follow_the_spec():
    assert reverse_instruction("Y") == (
        "Below is the response to an instruction, please guess the corresponding instruction for the given "
        "response.\nY\nGenerate the instruction for the above response."
    )
    alpaca = get_template("alpaca")
    assert alpaca.render("Do X").endswith("### Instruction:\nDo X\n\n### Response:")
    assert alpaca.render("Do X", "in").endswith("### Instruction:\nDo X\n\n### Input:\nin\n\n### Response:")
    assert get_template("wiz").render("Q", "I") == "Q\nI\n\n### Response:"
    assert get_template("vicuna").render("Q", "I").endswith("USER: Q\nInput:\nI ASSISTANT:")
    with pytest.raises(ValueError, match="unknown template"):
        get_template("llama9")


def test_context_token_rule():
    assert resolve_context_token("none", [5, 6], bos_id=1, eos_id=2) is None
    assert resolve_context_token("auto", [1, 5], bos_id=1, eos_id=2) is None  # Llama-style: BOS already there
    assert resolve_context_token("auto", [5, 6], bos_id=1, eos_id=2) == 1  # SmolLM2: no BOS added
    assert resolve_context_token("auto", [5, 6], bos_id=None, eos_id=2) == 2


def test_combine_computes_ratios_and_nulls_never_zero():
    texts = {key: ScoringText((1, 2, 3), 1, False) for key in STAT_KEYS}
    losses = {"A_direct": 2.0, "A_condition": 1.0, "Q_direct": 3.0, "Q_condition": 1.5}
    scores = combine(texts, losses)
    assert scores.ifd == pytest.approx(math.exp(1.0) / math.exp(2.0))
    assert scores.rifd == pytest.approx(math.exp(1.5) / math.exp(3.0))
    assert scores.ifd_loss == pytest.approx(0.5) and scores.rifd_loss == pytest.approx(0.5)
    assert scores.null_reason is None
    failed = combine(texts, {**losses, "A_direct": math.nan})
    assert failed.ifd is None and failed.ppl_A_direct is None and failed.rifd is not None
    assert "A_direct" in failed.null_reason
    empty = combine({**texts, "A_direct": None, "A_condition": None}, losses)
    assert empty.ifd is None and "empty" in empty.null_reason


@pytest.mark.slow
def test_texts_locate_the_target_and_truncate_as_the_reference(student_tokenizer):
    tok = student_tokenizer
    builder = build_text_builder(tok, "alpaca", ScoringConfig(max_length=2048))
    ctx = builder.prefix_ids
    assert ctx == (tok.bos_token_id,)  # SmolLM2 adds no BOS, so auto mode prepends one
    row = alpaca_rows(1, with_input=0)[0]
    texts = builder.build(row["instruction"], "", row["output"])
    condition = texts["A_condition"]
    assert tok.decode(condition.ids[condition.target_start :]).strip() == row["output"].strip()
    assert texts["A_direct"].ids == (*ctx, *tok.encode(row["output"]))
    assert texts["Q_direct"].ids == (*ctx, *tok.encode(row["instruction"]))
    q_cond = texts["Q_condition"]
    assert tok.decode(q_cond.ids[q_cond.target_start :]) == row["instruction"]
    assert row["output"] in tok.decode(q_cond.ids[: q_cond.target_start])

    short = build_text_builder(tok, "alpaca", ScoringConfig(max_length=64)).build(
        row["instruction"], "", row["output"] * 20
    )
    prompt_len = len(ctx) + len(tok.encode(get_template("alpaca").render(row["instruction"])))
    assert len(short["A_direct"].ids) == 64 - prompt_len + 1  # L - len(T(x)) + 1
    assert len(short["A_condition"].ids) == 64 and short["A_condition"].truncated


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["segments", "flex"])
def test_packed_engine_matches_the_straightforward_loop(
    student_model_dir, student_tokenizer, reference_scorer, kernel: str
):
    """float32: batch of one, context labels -100, outputs.loss (as the authors) vs the packed engine,
    with either attention kernel (flex: one compiled FlexAttention call per layer, padded packs)."""
    from srt_assets.models.student_hf import TransformersStudent

    rows = alpaca_rows(4, with_input=2)
    items = [ScoringItem(r["instruction"], r["input"], r["output"]) for r in rows]
    builder = build_text_builder(student_tokenizer, "alpaca", ScoringConfig())
    expected, _ = score_items(items, builder, reference_scorer)
    engine = TransformersStudent(
        student_model_dir, device="cpu", dtype="float32", token_budget=256, attention_kernel=kernel
    )
    assert engine.attention_kernel == kernel
    got, work = score_items(items, builder, engine)
    assert work["unique_texts"] == 4 * len(items)
    for want, have in zip(expected, got, strict=True):
        for field in ("ppl_A_direct", "ppl_A_condition", "ppl_Q_direct", "ppl_Q_condition", "ifd", "rifd"):
            assert getattr(have, field) == pytest.approx(getattr(want, field), rel=1e-4), field


class _WholeTextBuilder(TextBuilder):
    """The builder as it was: every text tokenized whole, then cut (the reference's behaviour)."""

    def _head(self, text: str, n_tokens: int) -> tuple[list[int], bool]:
        ids = self._encode(text)
        return ids[: max(n_tokens, 0)], len(ids) > n_tokens


class _RecordingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest_text = 0

    def encode(self, text: str) -> list[int]:
        self.longest_text = max(self.longest_text, len(text))
        return self.tokenizer.encode(text)


@pytest.mark.slow
def test_long_texts_are_cut_before_tokenizing_with_the_same_tokens(student_tokenizer):
    """A hostile 10M-character row is tokenized only as far as the length limit needs, and the
    texts of long rows are exactly those of tokenizing everything and cutting."""
    config = ScoringConfig(max_length=256)
    template = get_template("alpaca")
    context = (student_tokenizer.bos_token_id,)
    rows = alpaca_rows(3, with_input=1)
    no_spaces = "x" * 9_000 + "y" * 9_000
    cases = [(r["instruction"] * 40, r["input"], r["output"] * 60) for r in rows] + [(no_spaces, "", no_spaces)]
    windowed = TextBuilder(student_tokenizer, template, config, context[0])
    whole = _WholeTextBuilder(student_tokenizer, template, config, context[0])
    for case in cases:
        assert windowed.build(*case) == whole.build(*case)

    recording = _RecordingTokenizer(student_tokenizer)
    huge = "word " * 2_000_000
    builder = TextBuilder(recording, template, ScoringConfig(max_length=2048), context[0])
    long_answer, long_question = builder.build("Say it.", "", huge), builder.build(huge, "", "Done.")
    assert recording.longest_text < 300_000  # against 10M characters before
    assert all(long_answer[k].truncated and long_answer[k].n_targets > 0 for k in ("A_direct", "A_condition"))
    assert long_question["A_condition"].truncated and long_question["A_condition"].n_targets == 0


class SimulatedStudent:
    """A loss per text from its token ids, at once: scoring's bookkeeping without a model's cost."""

    def mean_losses(self, sequences, target_starts):
        return [1.0 + (sum(ids[start:]) % 97) / 97 for ids, start in zip(sequences, target_starts, strict=True)]


def variant_rows(n: int):
    import polars as pl

    words = [f"w{i}" for i in range(400)]
    return pl.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)],
        "variant": ["ori"] * n,
        "instruction": [f"Explain item {i}: " + " ".join(words[i % 300 : i % 300 + 40]) for i in range(n)],
        "input": [""] * n,
        "output": [f"Item {i} is " + " ".join(words[(i * 7) % 300 : (i * 7) % 300 + 60]) for i in range(n)],
    })  # fmt: skip


@pytest.mark.slow
def test_scores_made_block_by_block_equal_the_scores_made_at_once(student_tokenizer):
    from srt_assets.core.ifd import score_table, scores_frame

    builder = build_text_builder(student_tokenizer, "alpaca", ScoringConfig(max_length=256))
    rows = variant_rows(23)
    items = [ScoringItem(*row) for row in rows.select("instruction", "input", "output").iter_rows()]
    at_once, work = score_items(items, builder, SimulatedStudent())
    blocks, block_work = score_table(rows, builder, SimulatedStudent(), block_rows=5)
    assert blocks.equals(scores_frame(rows["sample_id"].to_list(), rows["variant"].to_list(), at_once))
    assert block_work == work and blocks.height == 23


@pytest.mark.slow
def test_scoring_memory_follows_the_block_not_the_rows(student_tokenizer):
    """Python's peak allocation while scoring 4x the rows stays within 20% of 1x; scored in one
    block (as before), the same work grows with the rows."""
    import tracemalloc

    from srt_assets.core.ifd import score_table

    builder = build_text_builder(student_tokenizer, "alpaca", ScoringConfig(max_length=256))

    def peak(rows: int, block_rows: int) -> int:
        table = variant_rows(rows)
        tracemalloc.start()
        try:
            score_table(table, builder, SimulatedStudent(), block_rows=block_rows)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(2000, 125) <= 1.2 * peak(500, 125)  # measured: 1.98 MB vs 1.79 MB
    assert peak(2000, 10**9) > 2.5 * peak(500, 10**9)  # measured: 26.1 MB vs 6.6 MB

"""IFD and reverse-IFD (docs/method.md, "Student statistics"), independent of any model backend.

For each (instruction, input, response) four token sequences are built with the authors' truncation
rules and target-span location; a backend returns the mean token loss of each sequence's target
span; this module turns those losses into perplexities and the two ratios. Nothing here imports a
model library: the tokenizer and the scorer come in through two small protocols.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import polars as pl

from srt_assets.core.cache import CallCache, content_key
from srt_assets.core.progress import BlockProgress
from srt_assets.core.templates import PromptTemplate, merged_instruction, reverse_instruction

ContextMode = Literal["auto", "none"]
STAT_KEYS = ("A_direct", "A_condition", "Q_direct", "Q_condition")
# A long text is tokenized from a window of its first (tokens needed + margin) x 16 characters,
# doubled until it yields enough tokens; 16 characters per token is above what English BPE averages.
WINDOW_CHARS_PER_TOKEN = 16
WINDOW_MARGIN_TOKENS = 16


class Tokenizer(Protocol):
    """What scoring needs of a tokenizer: ids of a text with the tokenizer's default special tokens."""

    def encode(self, text: str) -> list[int]: ...


class LossScorer(Protocol):
    """A student backend: the mean cross-entropy of ``ids[t:]`` given ``ids[:t]``, per sequence
    (each token predicted from all tokens before it); NaN where it cannot compute one."""

    def mean_losses(self, sequences: Sequence[Sequence[int]], target_starts: Sequence[int]) -> list[float]: ...


@dataclass(frozen=True)
class ScoringText:
    ids: tuple[int, ...]
    target_start: int  # first scored position; position 0 is never scored (nothing precedes it)
    truncated: bool

    @property
    def n_targets(self) -> int:
        return max(0, len(self.ids) - max(self.target_start, 1))


@dataclass(frozen=True)
class ScoringConfig:
    max_length: int = 2048
    # "auto": when the tokenizer adds no BOS of its own (SmolLM2, Qwen), put one context token (its
    # BOS, else EOS) in front of every text so that the first real token is scored too. "none": the
    # reference behaviour, tokenizer defaults only (a no-BOS tokenizer then never scores token 1).
    context: ContextMode = "auto"


class TextBuilder:
    """Builds the four scoring texts of a sample exactly as the reference does."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        config: ScoringConfig,
        context_token: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.config = config
        self.prefix_ids: tuple[int, ...] = (context_token,) if context_token is not None else ()

    def _encode(self, text: str) -> list[int]:
        return [*self.prefix_ids, *self.tokenizer.encode(text)]

    def _head(self, text: str, n_tokens: int) -> tuple[list[int], bool]:
        """The first ``n_tokens`` ids of ``text`` and whether it has more, tokenizing only a window of
        characters that grows until it holds enough tokens: a 10M-character row costs what a row at
        the length limit costs (docs/method.md, "Student statistics")."""
        n_tokens = max(n_tokens, 0)
        window = (n_tokens + WINDOW_MARGIN_TOKENS) * WINDOW_CHARS_PER_TOKEN
        while len(text) > window:
            ids = self._encode(text[:window])
            # The margin keeps the cut's last, possibly split, word clear of the tokens we keep.
            if len(ids) >= n_tokens + WINDOW_MARGIN_TOKENS:
                return ids[:n_tokens], True
            window *= 2
        ids = self._encode(text)
        return ids[:n_tokens], len(ids) > n_tokens

    def whole(self, text: str, max_length: int) -> ScoringText:
        ids, truncated = self._head(text, max_length)
        return ScoringText(tuple(ids), 1, truncated)

    def part(self, text: str, target: str) -> ScoringText:
        """``text`` ends with ``target``; the target starts at the token count of the text before it
        (counted up to one past the limit: a longer prefix leaves no target tokens either way)."""
        limit = self.config.max_length
        ids, truncated = self._head(text, limit)
        start = len(self._head(text[: text.rfind(target)], limit + 1)[0])
        return ScoringText(tuple(ids), start, truncated)

    def build(self, instruction: str, input_text: str, response: str) -> dict[str, ScoringText | None]:
        """The four texts; a text whose target is empty is None (its statistic will be null)."""
        texts: dict[str, ScoringText | None] = dict.fromkeys(STAT_KEYS)
        limit = self.config.max_length
        question = merged_instruction(instruction, input_text)
        if response:
            prompt = self.template.render(instruction, input_text)
            prompt_len = len(self._head(prompt, limit)[0])
            texts["A_direct"] = self.whole(response, limit - prompt_len + 1)
            texts["A_condition"] = self.part(prompt + response, response)
        if question and response:
            # T's no-input form around R(y), as the reference does.
            reverse_prompt = self.template.render(reverse_instruction(response))
            reverse_len = len(self._head(reverse_prompt, limit)[0])
            texts["Q_direct"] = self.whole(question, limit - reverse_len + 1)
            texts["Q_condition"] = self.part(reverse_prompt + question, question)
        return texts


def resolve_context_token(
    mode: ContextMode, encoded_probe: Sequence[int], bos_id: int | None, eos_id: int | None
) -> int | None:
    """The context token to prepend under ``mode``, given how the tokenizer encodes a probe text."""
    if mode == "none":
        return None
    if bos_id is not None and encoded_probe and encoded_probe[0] == bos_id:
        return None  # the tokenizer already starts every text with BOS, as Llama does
    return bos_id if bos_id is not None else eos_id


@dataclass(frozen=True)
class SampleScores:
    ppl_A_direct: float | None
    ppl_A_condition: float | None
    ppl_Q_direct: float | None
    ppl_Q_condition: float | None
    ifd: float | None
    rifd: float | None
    ifd_loss: float | None
    rifd_loss: float | None
    loss_A_direct: float | None
    loss_A_condition: float | None
    loss_Q_direct: float | None
    loss_Q_condition: float | None
    n_tokens_A: int
    n_tokens_Q: int
    truncated: bool
    null_reason: str | None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def combine(texts: dict[str, ScoringText | None], losses: dict[str, float | None]) -> SampleScores:
    """Losses of the four texts → perplexities, IFD, r-IFD and their loss ratios; null, never 0,
    for what could not be computed, with the first reason."""
    reasons = []
    clean: dict[str, float | None] = {}
    for key in STAT_KEYS:
        text = texts.get(key)
        loss = _finite(losses.get(key))
        if text is None:
            reasons.append(f"{key}: empty text")
            loss = None
        elif text.n_targets == 0:
            reasons.append(f"{key}: no target tokens left after truncation")
            loss = None
        elif loss is None:
            reasons.append(f"{key}: loss could not be computed")
        clean[key] = loss
    ppl = {key: math.exp(value) if value is not None else None for key, value in clean.items()}
    a_tokens = texts["A_condition"].n_targets if texts.get("A_condition") else 0
    q_tokens = texts["Q_condition"].n_targets if texts.get("Q_condition") else 0
    return SampleScores(
        ppl_A_direct=ppl["A_direct"],
        ppl_A_condition=ppl["A_condition"],
        ppl_Q_direct=ppl["Q_direct"],
        ppl_Q_condition=ppl["Q_condition"],
        ifd=_ratio(ppl["A_condition"], ppl["A_direct"]),
        rifd=_ratio(ppl["Q_condition"], ppl["Q_direct"]),
        ifd_loss=_ratio(clean["A_condition"], clean["A_direct"]),
        rifd_loss=_ratio(clean["Q_condition"], clean["Q_direct"]),
        loss_A_direct=clean["A_direct"],
        loss_A_condition=clean["A_condition"],
        loss_Q_direct=clean["Q_direct"],
        loss_Q_condition=clean["Q_condition"],
        n_tokens_A=a_tokens,
        n_tokens_Q=q_tokens,
        truncated=any(t.truncated for t in texts.values() if t is not None),
        null_reason="; ".join(reasons) or None,
    )


@dataclass(frozen=True)
class ScoringItem:
    instruction: str
    input: str
    response: str


def score_items(
    items: Sequence[ScoringItem],
    builder: TextBuilder,
    scorer: LossScorer,
) -> tuple[list[SampleScores], dict[str, int]]:
    """Score many samples with one call to the backend; identical texts are scored once.

    Returns the scores and work statistics (texts built, unique texts, tokens scored).
    """
    per_item = [builder.build(i.instruction, i.input, i.response) for i in items]
    unique: dict[tuple[tuple[int, ...], int], int] = {}
    for texts in per_item:
        for text in texts.values():
            if text is not None and text.n_targets > 0:
                unique.setdefault((text.ids, max(text.target_start, 1)), len(unique))
    keys = list(unique)
    losses = scorer.mean_losses([k[0] for k in keys], [k[1] for k in keys]) if keys else []
    results = []
    for texts in per_item:
        text_losses = {
            name: losses[unique[(t.ids, max(t.target_start, 1))]] if t is not None and t.n_targets > 0 else None
            for name, t in texts.items()
        }
        results.append(combine(texts, text_losses))
    built = sum(1 for texts in per_item for t in texts.values() if t is not None)
    stats = {
        "texts": built,
        "unique_texts": len(keys),
        "tokens": sum(len(k[0]) for k in keys),
        "target_tokens": sum(len(k[0]) - k[1] for k in keys),
    }
    return results, stats


SCORING_BLOCK_ROWS = 2048  # variant rows whose texts are built and scored at once


def score_table(
    rows: pl.DataFrame,
    builder: TextBuilder,
    scorer: LossScorer,
    block_rows: int = SCORING_BLOCK_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The scores table of ``rows`` (``sample_id``, ``variant``, ``instruction``, ``input``, ``output``),
    built ``block_rows`` at a time: token ids exist for one block only, and each block's scores
    become columns at once, so memory follows the block, not the source (a text repeated in a later
    block is scored again, or served by a caching scorer). ``progress(rows_done, rows)``."""
    frames, stats = [], dict.fromkeys(("texts", "unique_texts", "tokens", "target_tokens"), 0)
    blocks = BlockProgress(progress, rows.height) if progress else None
    for start in range(0, rows.height, block_rows):
        block = rows.slice(start, block_rows)
        items = [ScoringItem(*row) for row in block.select("instruction", "input", "output").iter_rows()]
        if blocks and isinstance(scorer, CachedScorer):  # its texts done, counted as rows of the table
            scorer.progress = blocks.for_block(start, block.height)
        results, work = score_items(items, builder, scorer)
        frames.append(scores_frame(block["sample_id"].to_list(), block["variant"].to_list(), results))
        stats = {name: stats[name] + work[name] for name in stats}
        if blocks:
            blocks.block_done(start, block.height)
    table = pl.concat(frames) if frames else pl.DataFrame(schema=score_schema())
    return table, stats


class CachedScorer:
    """Wraps a LossScorer with a durable cache keyed by the model and the exact token sequence.

    Work goes to the backend in chunks and each finished chunk is stored at once, so a killed run
    resumes where it stopped and a rerun of unchanged data calls the model for nothing. Failed
    (NaN) losses are not cached: they are retried next time.
    """

    def __init__(self, scorer: LossScorer, cache: CallCache, model_key: str, chunk_size: int = 512, progress=None):
        self.scorer = scorer
        self.cache = cache
        self.model_key = model_key
        self.chunk_size = chunk_size
        self.progress = progress
        self.hits = 0
        self.computed = 0

    def mean_losses(self, sequences: Sequence[Sequence[int]], target_starts: Sequence[int]) -> list[float]:

        keys = [content_key(self.model_key, list(s), t) for s, t in zip(sequences, target_starts, strict=True)]
        known = self.cache.get_many(keys)
        losses = [known.get(k, math.nan) for k in keys]
        # Sorted, so texts that share a template prefix land in the same chunk (and pack).
        missing = sorted((i for i, k in enumerate(keys) if k not in known), key=lambda i: sequences[i])
        self.hits += len(keys) - len(missing)
        for begin in range(0, len(missing), self.chunk_size):
            chunk = missing[begin : begin + self.chunk_size]
            values = self.scorer.mean_losses([sequences[i] for i in chunk], [target_starts[i] for i in chunk])
            for i, value in zip(chunk, values, strict=True):
                losses[i] = value
            self.cache.put_many({keys[i]: v for i, v in zip(chunk, values, strict=True) if math.isfinite(v)})
            self.computed += len(chunk)
            if self.progress:
                self.progress(begin + len(chunk), len(missing))
        return losses


def score_schema() -> dict:
    """Column types of a student-scores table (keyed by sample_id and variant)."""

    floats = [
        "ppl_A_direct", "ppl_A_condition", "ppl_Q_direct", "ppl_Q_condition",
        "ifd", "rifd", "ifd_loss", "rifd_loss",
        "loss_A_direct", "loss_A_condition", "loss_Q_direct", "loss_Q_condition",
    ]  # fmt: skip
    return {
        "sample_id": pl.String(),
        "variant": pl.String(),
        **{name: pl.Float64() for name in floats},
        "n_tokens_A": pl.Int64(),
        "n_tokens_Q": pl.Int64(),
        "truncated": pl.Boolean(),
        "null_reason": pl.String(),
    }


SCORE_COLUMNS = {
    "sample_id": "the raw sample scored",
    "variant": "which of its texts: ori, Q, A or QA",
    "ppl_A_direct": "the student's perplexity of the answer alone",
    "ppl_A_condition": "the student's perplexity of the answer after the instruction",
    "ppl_Q_direct": "the student's perplexity of the instruction alone",
    "ppl_Q_condition": "the student's perplexity of the instruction after the answer",
    "ifd": "IFD = ppl_A_condition / ppl_A_direct: how little the instruction helps (exact)",
    "rifd": "reverse IFD = ppl_Q_condition / ppl_Q_direct: how little the answer tells of the instruction (exact)",
    "ifd_loss": "loss_A_condition / loss_A_direct: the IFD's ratio of mean losses",
    "rifd_loss": "loss_Q_condition / loss_Q_direct: the reverse IFD's ratio of mean losses",
    "loss_A_direct": "mean token loss of the answer alone",
    "loss_A_condition": "mean token loss of the answer after the instruction",
    "loss_Q_direct": "mean token loss of the instruction alone",
    "loss_Q_condition": "mean token loss of the instruction after the answer",
    "n_tokens_A": "answer tokens scored",
    "n_tokens_Q": "instruction tokens scored",
    "truncated": "a text was cut to max_length tokens",
    "null_reason": "why a score is missing (e.g. 'A_condition: no target tokens left after truncation')",
}


def scores_frame(sample_ids: Sequence[str], variants: Sequence[str], scores: Sequence[SampleScores]):
    """One row per scored (sample_id, variant), in the order given."""

    rows = [
        {"sample_id": sid, "variant": variant, **dataclasses.asdict(score)}
        for sid, variant, score in zip(sample_ids, variants, scores, strict=True)
    ]
    return pl.DataFrame(rows, schema=score_schema())

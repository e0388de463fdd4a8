"""The student as a session: its tokenizer's scoring texts, a loss backend that loads on the first
cache miss, and the durable loss cache in front of it. The Dagster ``student`` resource is
``StudentSettings`` and hands these sessions out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, Field

from srt_assets.core.cache import open_cache
from srt_assets.core.ifd import (
    CachedScorer,
    LossScorer,
    SampleScores,
    ScoringConfig,
    ScoringItem,
    TextBuilder,
    resolve_context_token,
    score_items,
    score_table,
)
from srt_assets.core.templates import get_template
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import BUNDLED_MODEL, ModelIdentity, model_identity


class StudentSettings(BaseModel):
    """The student: the model being fine-tuned, whose perplexities select the data."""

    model: str = Field(
        default=BUNDLED_MODEL,
        description="'bundled:smollm2-135m-instruct' (offline default), a Hugging Face model directory or hub id",
    )
    template: str = Field(default="chat", description="alpaca | wiz | vicuna | chat (the tokenizer's own)")
    max_length: int = Field(default=2048, description="L: maximum tokens per scored text")
    context: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: prepend BOS/EOS as context when the tokenizer adds no BOS; none: reference behaviour",
    )

    def identity(self, models_dir: Path) -> ModelIdentity:
        return model_identity(self.model, models_dir)

    def scoring_config(self) -> ScoringConfig:
        return ScoringConfig(max_length=self.max_length, context=self.context)


def chat_formatter(tokenizer):
    """T(x) for template ``chat``: the tokenizer's chat template up to the assistant's turn."""

    def render(message: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )

    return render


def build_text_builder(tokenizer, template: str, config: ScoringConfig) -> TextBuilder:
    context = resolve_context_token(
        config.context, tokenizer.encode("probe"), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    chat = chat_formatter(tokenizer) if template == "chat" else None
    return TextBuilder(tokenizer, get_template(template, chat), config, context)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class LazyStudent:
    """A LossScorer that loads its backend on first use, so a fully cached run loads no model."""

    def __init__(self, model_path: str, compute: ComputeSettings, max_length: int = 2048):
        self.compute = compute
        self.model_path = model_path
        self.max_length = max_length
        self._scorer: LossScorer | None = None
        self.was_loaded = False  # whether any call needed the model (kept after close, for metadata)

    def _load(self) -> LossScorer:
        if self.compute.backend == "vllm":
            from srt_assets.models.student_vllm import VLLMStudent

            return VLLMStudent(self.model_path, dtype=self.compute.dtype, token_budget=self.compute.token_budget)
        from srt_assets.models.student_hf import TransformersStudent

        return TransformersStudent(
            self.model_path,
            device=self.compute.resolved_device(),
            dtype=self.compute.dtype,
            token_budget=self.compute.token_budget,
            attention_kernel=self.compute.attention_kernel,
        )

    def close(self) -> None:
        """Release the backend (vLLM holds worker processes and memory)."""
        if self._scorer is not None and hasattr(self._scorer, "close"):
            self._scorer.close()
        self._scorer = None

    def mean_losses(self, sequences, target_starts) -> list[float]:
        if self._scorer is None:
            self._scorer = self._load()
            self.was_loaded = True
        return self._scorer.mean_losses(sequences, target_starts)


@dataclass
class StudentSession:
    """A ready student: build texts with ``builder``, score them through ``scorer`` (cached)."""

    identity: ModelIdentity
    builder: TextBuilder
    scorer: CachedScorer
    backend: LazyStudent

    @property
    def model_loaded(self) -> bool:
        return self.backend.was_loaded

    def score(self, items: Sequence[ScoringItem]) -> tuple[list[SampleScores], dict[str, int]]:
        """IFD and r-IFD of every (instruction, input, response), with work statistics."""
        return score_items(items, self.builder, self.scorer)

    def score_table(self, rows: pl.DataFrame, progress=None) -> tuple[pl.DataFrame, dict[str, int]]:
        """The scores table of many variant rows, a block at a time (memory follows the block)."""
        return score_table(rows, self.builder, self.scorer, progress=progress)

    def answer_losses(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[int]]:
        """Mean loss of each answer given its prompt in the training template, and its token count."""
        texts = [self.builder.part(self.builder.template.render(prompt) + answer, answer) for prompt, answer in pairs]
        losses = self.scorer.mean_losses([t.ids for t in texts], [max(t.target_start, 1) for t in texts])
        return losses, [t.n_targets for t in texts]


@contextmanager
def student_session(
    settings: StudentSettings,
    compute: ComputeSettings,
    models_dir: Path,
    cache_location: str | Path,
    model_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk_size: int = 256,
) -> Iterator[StudentSession]:
    """The student (or, with ``model_path``, a fine-tuned checkpoint of it scored the same way) behind
    the durable loss cache. The model loads on the first cache miss and is released on exit."""
    identity = settings.identity(models_dir) if model_path is None else model_identity(model_path, models_dir)
    builder = build_text_builder(load_tokenizer(identity.path), settings.template, settings.scoring_config())
    backend = LazyStudent(identity.path, compute, settings.max_length)
    cache = open_cache(cache_location, "student_losses")
    scorer = CachedScorer(
        backend,
        cache,
        model_key=f"{identity.fingerprint}|{compute.dtype}|{settings.context}",
        chunk_size=chunk_size,
        progress=progress,
    )
    try:
        yield StudentSession(identity, builder, scorer, backend)
    finally:
        backend.close()
        cache.close()

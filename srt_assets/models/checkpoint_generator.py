"""Answers of a fine-tuned checkpoint to held-out prompts, as a ``ChatModel``: the conversation
is rendered with the training template and continued greedily, so answers go through the same
durable call cache as teacher calls. The engine follows the ``gpu`` resource's student backend:
vLLM's batched generation, or batched transformers ``generate``; it loads on the first cache miss."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from srt_assets.core.generation import Generation, GenerationParams, Messages, OnDone, TextModel
from srt_assets.core.ifd import ScoringConfig
from srt_assets.core.templates import render_conversation
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import model_fingerprint
from srt_assets.models.student import build_text_builder


class CheckpointGenerator:
    def __init__(self, model_path: str, template: str, compute: ComputeSettings, batch_size: int):
        engine = "" if compute.backend == "transformers" else f"|{compute.backend}"
        self._precision = compute.resolved_generation_dtype()
        self.model_id = f"checkpoint:{model_fingerprint(Path(model_path))}|{template}|{self._precision}{engine}"
        self._model_path = model_path
        self._template = template
        self._compute = compute
        self._batch_size = batch_size
        self._model: TextModel | None = None  # a local engine, loaded on the first cache miss

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        if self._model is None:
            self._model, tokenizer = self._load()
            self._render = build_text_builder(tokenizer, self._template, ScoringConfig()).template.render
        prompts = [render_conversation(self._render, list(messages)) for messages in conversations]
        return self._model.generate_texts(prompts, params, on_done)

    def _load(self):
        if self._compute.backend == "vllm":
            from srt_assets.models.vllm_chat import VLLMGenerator

            engine = VLLMGenerator(self._model_path, model_id=self.model_id, dtype=self._precision)
            return engine, engine.llm.get_tokenizer()
        from srt_assets.models.transformers_chat import TransformersGenerator

        engine = TransformersGenerator(
            self._model_path,
            model_id=self.model_id,
            device=self._compute.resolved_device(),
            dtype=self._precision,
            batch_size=self._batch_size,
        )
        return engine, engine.tokenizer

    def close(self) -> None:
        """Release the engine (vLLM holds worker processes and memory)."""
        if self._model is not None and hasattr(self._model, "close"):
            self._model.close()
        self._model = None

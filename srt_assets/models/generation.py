"""Answers of a fine-tuned checkpoint to held-out prompts, as a ``TeacherBackend``: the user turn is
rendered with the training template and continued greedily, so answers go through the same durable
call cache as teacher calls. The model loads on the first cache miss."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from srt_assets.core.ifd import ScoringConfig
from srt_assets.core.reflection import Messages
from srt_assets.core.teacher import Generation, GenerationParams, OnDone
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import model_fingerprint


class CheckpointGenerator:
    def __init__(self, model_path: str, template: str, compute: ComputeSettings, batch_size: int):
        self.model_id = f"checkpoint:{model_fingerprint(Path(model_path))}|{template}"
        self._model_path = model_path
        self._template = template
        self._compute = compute
        self._batch_size = batch_size
        self._model = None

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        from srt_assets.models.student import build_text_builder
        from srt_assets.models.teacher_transformers import TransformersTeacher

        if self._model is None:
            self._model = TransformersTeacher(
                self._model_path,
                model_id=self.model_id,
                device=self._compute.resolved_device(),
                dtype=self._compute.dtype,
                batch_size=self._batch_size,
            )
            self._render = build_text_builder(self._model.tokenizer, self._template, ScoringConfig()).template.render
        prompts = [self._render(messages[-1]["content"]) for messages in conversations]
        return self._model.generate_texts(prompts, params, on_done)

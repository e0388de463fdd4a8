"""Fine-tuning plan: hyperparameters, the deterministic batch order, the learning-rate schedule and
the checkpoint manifest. Pure logic; the torch loop lives in ``srt_assets.models.trainer``."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from srt_assets.core.ifd import TextBuilder


class TrainingHyperparameters(BaseModel):
    """SFT settings, shared by every checkpoint of a source so the comparison is fair. Defaults are
    small, for a CPU demo; the paper's Llama-2 setting is ``PAPER_SETTING`` (Adam, lr 2e-5, global
    batch 128, 3 epochs, max length 2048, warmup 3%, weight decay 0, cosine decay as in FastChat).
    The Dagster resource ``training`` is this model, so each setting is defined here only."""

    learning_rate: float = Field(5e-5, description="peak learning rate (the paper: 2e-5 for 7B)")
    epochs: float = Field(1.0, description="passes over the data; fractions allowed")
    batch_size: int = Field(4, description="sequences per micro-batch (global batch = this x grad_accumulation)")
    grad_accumulation: int = Field(1, description="micro-batches per optimizer step")
    max_length: int = Field(512, description="tokens per training sequence (the paper: 2048)")
    warmup_ratio: float = Field(0.03, description="share of the steps with linear warmup, then cosine decay")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    max_steps: int | None = Field(None, description="cap on optimizer steps (demos and tests)")
    seed: int = Field(0, description="seed of the data order and the model's initial state")
    lora_r: int = Field(0, description="> 0: train LoRA adapters (peft) of this rank, merged into the checkpoint")
    lora_alpha: int = Field(16, description="LoRA scaling")
    save_every: int = Field(20, description="optimizer steps between resumable progress saves")

    def as_dict(self) -> dict:
        """Only the hyperparameters (a subclass, such as the Dagster resource, may carry more)."""
        return {name: getattr(self, name) for name in TrainingHyperparameters.model_fields}


PAPER_SETTING = TrainingHyperparameters(
    learning_rate=2e-5,
    epochs=3,
    batch_size=4,
    grad_accumulation=32,
    max_length=2048,
    warmup_ratio=0.03,
    weight_decay=0.0,
)


MANIFEST = "srt_manifest.json"  # written into every checkpoint directory


def read_manifest(checkpoint: Path) -> dict | None:
    """A checkpoint's manifest (base model, data, hyperparameters, losses), or None if unfinished."""
    path = Path(checkpoint) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def batch_plan(n_examples: int, hp: TrainingHyperparameters) -> list[list[int]]:
    """Example indices of every micro-batch, in training order: each epoch a fresh permutation from
    the seed, so a resumed run sees exactly the batches the interrupted one would have."""
    if n_examples == 0:
        return []
    rng = random.Random(hp.seed)
    whole_epochs = math.ceil(hp.epochs)
    order: list[int] = []
    for _ in range(whole_epochs):
        permutation = list(range(n_examples))
        rng.shuffle(permutation)
        order.extend(permutation)
    order = order[: max(1, round(n_examples * hp.epochs))]
    micro = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
    if hp.max_steps is not None:
        micro = micro[: hp.max_steps * hp.grad_accumulation]
    return micro


def optimizer_steps(n_micro_batches: int, grad_accumulation: int) -> int:
    return math.ceil(n_micro_batches / grad_accumulation)


def learning_rate(step: int, total_steps: int, hp: TrainingHyperparameters) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to zero."""
    warmup = math.ceil(total_steps * hp.warmup_ratio)
    if step < warmup:
        return hp.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return hp.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_identity(base_fingerprint: str, dataset_fingerprint: str, template: str, hp: TrainingHyperparameters) -> dict:
    """What makes two trainings the same: a saved progress state is resumed only if this matches."""
    return {
        "base_model_fingerprint": base_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "template": template,
        "hyperparameters": hp.as_dict(),
    }


def sft_examples(
    builder: TextBuilder, rows: Iterable[tuple[str, str, str]], eos_id: int | None
) -> list[tuple[tuple[int, ...], int]]:
    """(token ids, first response position) per (instruction, input, output) row: the training
    template's prompt followed by the response and EOS, cut at the builder's max length. Rows whose
    response is cut away entirely are skipped (they would train nothing)."""
    examples = []
    limit = builder.config.max_length
    for instruction, input_text, output in rows:
        prompt = builder.template.render(instruction, input_text)
        text = builder.part(prompt + output, output)
        ids = (*text.ids, eos_id) if eos_id is not None else text.ids
        ids = ids[:limit]
        if len(ids) > max(text.target_start, 1):
            examples.append((ids, max(text.target_start, 1)))
    return examples

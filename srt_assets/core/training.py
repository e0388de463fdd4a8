"""Fine-tuning plan: hyperparameters, the deterministic batch order, the learning-rate schedule and
the checkpoint manifest. Pure logic; the torch loop lives in ``srt_assets.models.trainer``."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from srt_assets.core.ifd import TextBuilder


@dataclass(frozen=True)
class TrainingHyperparameters:
    """SFT settings. Defaults are small, for a CPU demo; the paper's Llama-2 setting is
    ``PAPER_SETTING`` (Adam, lr 2e-5, global batch 128, 3 epochs, max length 2048, warmup 3%,
    weight decay 0, cosine decay as in FastChat)."""

    learning_rate: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 4  # sequences per optimizer step (global batch = batch_size × grad_accumulation)
    grad_accumulation: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = None  # caps the optimizer steps (demos and tests)
    seed: int = 0
    lora_r: int = 0  # > 0: train LoRA adapters (peft) of this rank and merge them into the checkpoint
    lora_alpha: int = 16
    save_every: int = 50  # optimizer steps between resumable progress saves

    def as_dict(self) -> dict:
        return asdict(self)


PAPER_SETTING = TrainingHyperparameters(
    learning_rate=2e-5,
    epochs=3,
    batch_size=4,
    grad_accumulation=32,
    max_length=2048,
    warmup_ratio=0.03,
    weight_decay=0.0,
)


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

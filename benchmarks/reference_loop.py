"""The plain torch SFT loop srt used before TRL, kept only as the benchmark's reference
(benchmarks/bench_training.py): the same examples, loss on the response tokens, AdamW, warmup then
cosine decay, one process. Not used by the pipeline."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from srt_assets.core.training import MANIFEST, TrainingHyperparameters, read_manifest
from srt_assets.models.loading import DTYPES, resolve_device

IGNORE = -100


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


@dataclass
class TrainingResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean response-token loss per optimizer step
    tokens_trained: int = 0  # all tokens that went through the model
    target_tokens: int = 0  # the response tokens the loss was taken on
    seconds: float = 0.0
    resumed_from_step: int = 0
    reused: bool = False  # an identical finished checkpoint was already there

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def _collate(examples: Sequence[tuple[Sequence[int], int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        tensor = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = tensor
        attention[row, : len(ids)] = 1
        labels[row, start : len(ids)] = tensor[start:]
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_sft(
    model_path: str,
    examples: Sequence[tuple[Sequence[int], int]],
    hp: TrainingHyperparameters,
    out_dir: Path,
    identity: dict,
    device: str = "auto",
    dtype: str = "float32",
    on_step: Callable[[int, int, float], None] | None = None,
    manifest_extra: dict | None = None,
) -> TrainingResult:
    """Fine-tune ``model_path`` on ``examples`` (token ids, first response position) into ``out_dir``.

    ``identity`` describes the run (base model, data, hyperparameters): a finished checkpoint with
    the same identity is reused as is, and a saved progress state with the same identity is resumed.
    ``on_step(step, total, loss)`` is called after every optimizer step; ``manifest_extra`` goes
    into the checkpoint's manifest (names of the base model and dataset, for people reading it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    existing = read_manifest(out_dir)
    if existing and existing.get("identity") == identity:
        saved = existing["training"]
        return TrainingResult(**{**saved, "reused": True})
    progress_dir = out_dir.with_name(f".{out_dir.name}.progress")
    state_file = progress_dir / "state.pt"
    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch.manual_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(torch_device)
    if hp.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise RuntimeError("lora_r > 0 needs peft: pip install 'srt-assets[lora]'") from exc
        model = get_peft_model(
            model, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    plan = batch_plan(len(examples), hp)
    total = optimizer_steps(len(plan), hp.grad_accumulation)
    result = TrainingResult(steps=total)
    if state_file.is_file():
        state = torch.load(state_file, map_location=torch_device, weights_only=False)
        if state["identity"] == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            result.losses = state["losses"]
            result.tokens_trained, result.target_tokens = state["tokens"]
            result.resumed_from_step = len(result.losses)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = (
        torch.autocast(device_type=torch_device.type, dtype=DTYPES[dtype]) if dtype != "float32" else nullcontext()
    )
    for step in range(result.resumed_from_step, total):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, hp)
        micro_batches = plan[step * hp.grad_accumulation : (step + 1) * hp.grad_accumulation]
        step_loss = 0.0
        for batch_indices in micro_batches:
            batch = _collate([examples[i] for i in batch_indices], pad_id, torch_device)
            with autocast:
                loss = model(**batch).loss / len(micro_batches)
            loss.backward()
            step_loss += float(loss.detach())
            result.tokens_trained += int(batch["attention_mask"].sum())
            result.target_tokens += int((batch["labels"] != IGNORE).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        done = step + 1
        if done < total and done % max(hp.save_every, 1) == 0:
            progress_dir.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(
                {
                    "identity": identity,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "losses": result.losses,
                    "tokens": (result.tokens_trained, result.target_tokens),
                },
                state_file,
            )
        if on_step:
            on_step(done, total, step_loss)
    result.seconds = round(time.perf_counter() - started, 2)
    if hp.lora_r > 0:
        model = model.merge_and_unload()
    model.eval()
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    training = asdict(result) | {"reused": False}
    manifest = {**(manifest_extra or {}), "identity": identity, "training": training, "final_loss": result.final_loss}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    shutil.rmtree(progress_dir, ignore_errors=True)
    return result

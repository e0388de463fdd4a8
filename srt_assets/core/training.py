"""Fine-tuning plan: hyperparameters, the training examples, the launch command and the checkpoint
manifest. Pure logic; the training itself (TRL's SFTTrainer) lives in ``srt_assets.models.trainer``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from srt_assets.core.ifd import TextBuilder


class TrainingHyperparameters(BaseModel):
    """SFT settings, shared by every checkpoint of a source so the comparison is fair. Defaults are
    small, for a CPU demo; the paper's Llama-2 setting is ``configs/training/paper_fsdp_8gpu.yaml``
    (Adam, lr 2e-5, global batch 128, 3 epochs, max length 2048, warmup 3%, weight decay 0, cosine).
    The Dagster resource ``training`` is this model, so each setting is defined here only."""

    learning_rate: float = Field(5e-5, description="peak learning rate (the paper: 2e-5 for 7B)")
    epochs: float = Field(1.0, description="passes over the data; fractions allowed")
    batch_size: int = Field(
        4, description="sequences per micro-batch and process (global batch = this x grad_accumulation x processes)"
    )
    grad_accumulation: int = Field(1, description="micro-batches per optimizer step")
    max_length: int = Field(512, description="tokens per training sequence (the paper: 2048)")
    warmup_ratio: float = Field(0.03, description="share of the steps with linear warmup, then cosine decay")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    max_steps: int | None = Field(None, description="cap on optimizer steps (demos and tests)")
    seed: int = Field(0, description="seed of the data order and the model's initial state")
    lora_r: int = Field(0, description="> 0: train LoRA adapters (peft) of this rank, merged into the checkpoint")
    lora_alpha: int = Field(16, description="LoRA scaling")
    save_every: int = Field(20, description="optimizer steps between resumable progress saves")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    packing: bool = Field(False, description="pack several rows into each max_length sequence (TRL's best-fit)")

    def as_dict(self) -> dict:
        """Only the hyperparameters (a subclass, such as the Dagster resource, may carry more)."""
        return {name: getattr(self, name) for name in TrainingHyperparameters.model_fields}


MANIFEST = "srt_manifest.json"  # written into every checkpoint directory


def read_manifest(checkpoint: Path) -> dict | None:
    """A checkpoint's manifest (base model, data, hyperparameters, losses), or None if unfinished."""
    path = Path(checkpoint) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def finished_training(checkpoint: Path, identity: dict) -> dict | None:
    """The training record of a finished checkpoint made by the same training, marked reused; None
    when there is none and it must be trained."""
    manifest = read_manifest(checkpoint)
    if manifest and manifest.get("identity") == identity:
        return {**manifest["training"], "reused": True}
    return None


def run_identity(
    base_fingerprint: str, dataset_fingerprint: str, template: str, hp: TrainingHyperparameters, processes: int = 1
) -> dict:
    """What makes two trainings the same: a saved progress state is resumed only if this matches.
    The process count is part of it, because it multiplies the global batch."""
    return {
        "base_model_fingerprint": base_fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "template": template,
        "hyperparameters": hp.as_dict(),
        "processes": processes,
    }


SHIPPED_ACCELERATE_CONFIGS = ("ddp", "fsdp_full_shard", "deepspeed_zero3")


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped accelerate config by name (``srt_assets/accelerate/<name>.yaml``) or a YAML path."""
    if name_or_path in SHIPPED_ACCELERATE_CONFIGS:
        return Path(__file__).resolve().parent.parent / "accelerate" / f"{name_or_path}.yaml"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"accelerate config '{name_or_path}': no such file, and not one of {', '.join(SHIPPED_ACCELERATE_CONFIGS)}"
        )
    return path


def launch_command(
    job_dir: Path, processes: int, accelerate_config: str | None, on_gpu: bool, python: str = sys.executable
) -> list[str]:
    """The command that trains on ``job_dir``. One process with no accelerate config: the worker
    itself (``accelerate launch`` would only add its own start-up, about half a minute on a CPU).
    Otherwise ``accelerate launch`` of the worker (through ``sft_launch launch``, which ties the
    launcher's life to its parent's): ``processes`` ranks (one per GPU, or gloo ranks on CPU),
    distributed as the accelerate config says (DDP when none is named)."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    module = ["-m", "srt_assets.models.sft_launch"]
    worker = [*module, str(job_dir)]
    if processes == 1 and not accelerate_config:
        return [python, *worker]
    command = [python, *module, "launch", "--num_processes", str(processes)]
    if accelerate_config:  # precision comes from the trainer's own bf16 flag either way
        command += ["--config_file", str(accelerate_config_path(accelerate_config))]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    if not on_gpu:  # said explicitly, so accelerate does not warn that it picked a default
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes))]
    return [*command, *worker]


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

"""Supervised fine-tuning through TRL's SFTTrainer, loss on the response tokens of our template.

The same function runs in one process or in every rank that ``accelerate launch`` starts (DDP,
FSDP, DeepSpeed: the Trainer reads the distributed setup from the environment). Around TRL it adds
what the checkpoint asset needs: a finished checkpoint with the same identity is reused, a killed
training resumes from its last save (only a save of the same identity), the result is written
atomically with a manifest, and every optimizer step's loss is reported.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from srt_assets.core.files import atomic_write_text
from srt_assets.core.training import MANIFEST, TrainingHyperparameters, finished_training, read_manifest
from srt_assets.models.loading import resolve_device

__all__ = ["MANIFEST", "TrainingResult", "read_manifest", "train_sft"]

IDENTITY_FILE = "srt_identity.json"  # in the progress folder: which training its saves belong to


@dataclass
class TrainingResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean response-token loss per optimizer step
    tokens_trained: int = 0  # non-padding tokens that went through the model, all processes
    target_tokens: int = 0  # response tokens the loss is taken on, per pass over the data
    seconds: float = 0.0
    resumed_from_step: int = 0
    reused: bool = False  # an identical finished checkpoint was already there
    processes: int = 1

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def last_complete_save(progress_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder whose trainer state was written (a save cut short by a
    kill has none, and is skipped)."""
    saves = [p for p in progress_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(saves, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def prune_incomplete_saves(progress_dir: Path) -> None:
    """Remove saves cut short by a kill: the Trainer's rotation counts them as the newest and would
    delete a complete one in their favour."""
    for save in progress_dir.glob("checkpoint-*"):
        if not (save / "trainer_state.json").is_file():
            shutil.rmtree(save, ignore_errors=True)


def _dataset(examples: Sequence[tuple[Sequence[int], int]]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [list(ids) for ids, _ in examples],
            "completion_mask": [[0] * start + [1] * (len(ids) - start) for ids, start in examples],
        }
    )


def _config(hp: TrainingHyperparameters, progress_dir: Path, device: str, dtype: str):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(progress_dir),
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps if hp.max_steps is not None else -1,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accumulation,
        warmup_steps=min(hp.warmup_ratio, 0.999),  # below 1: a share of the steps
        weight_decay=hp.weight_decay,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=hp.seed,
        data_seed=hp.seed,
        max_length=hp.max_length,
        packing=hp.packing,
        completion_only_loss=True,
        gradient_checkpointing=hp.gradient_checkpointing,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        save_strategy="steps",
        save_steps=max(hp.save_every, 1),
        save_total_limit=1,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device != "cpu",
        # full fine-tuning keeps fp32 master weights (bf16 autocast); LoRA freezes the base in bf16
        model_init_kwargs={"dtype": "bfloat16" if hp.lora_r > 0 and dtype == "bfloat16" else "float32"},
    )


def _step_reporter(on_step: Callable[[int, int, float], None] | None):
    from transformers import TrainerCallback

    class ReportSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False  # the finished model is written by train_sft, not as a progress save

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_step and state.is_world_process_zero and logs and "loss" in logs:
                on_step(state.global_step, state.max_steps, float(logs["loss"]))

    return ReportSteps()


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

    ``identity`` describes the run (base model, data, hyperparameters, processes): a finished
    checkpoint with the same identity is reused as is, and saved progress with the same identity is
    resumed. ``on_step(step, total, loss)`` is called on rank 0 after every optimizer step;
    ``manifest_extra`` goes into the checkpoint's manifest (for people reading it).
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    out_dir = Path(out_dir)
    finished = finished_training(out_dir, identity)
    if finished:
        return TrainingResult(**finished)
    device = resolve_device(device).type  # "cpu" or "cuda": each rank takes its own GPU
    state = PartialState(cpu=device == "cpu")
    progress_dir = out_dir.with_name(f".{out_dir.name}.progress")
    resume_from = _prepare_progress(state, progress_dir, identity)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = _lora_config(hp)
    trainer = SFTTrainer(
        model=model_path,
        args=_config(hp, progress_dir, device, dtype),
        train_dataset=_dataset(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_step_reporter(on_step)],
    )
    trainer.remove_callback(PrinterCallback)  # steps are reported through on_step
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = trainer.state.log_history
    result = TrainingResult(
        steps=trainer.state.max_steps,
        losses=[float(entry["loss"]) for entry in history if "loss" in entry],
        tokens_trained=int(trainer.state.num_input_tokens_seen),
        target_tokens=sum(len(ids) - start for ids, start in examples),
        seconds=round(time.perf_counter() - started, 2),
        resumed_from_step=int(resume_from.name.rsplit("-", 1)[1]) if resume_from else 0,
        processes=state.num_processes,
    )
    manifest = {**(manifest_extra or {}), "identity": identity, "training": asdict(result) | {"reused": False}}
    _publish(trainer, tokenizer, state, out_dir, manifest | {"final_loss": result.final_loss}, merge=bool(peft_config))
    if state.is_main_process:
        shutil.rmtree(progress_dir, ignore_errors=True)
    state.wait_for_everyone()
    return result


def _prepare_progress(state, progress_dir: Path, identity: dict) -> Path | None:
    """The save to resume from: the last complete one of a run with the same identity. Rank 0
    clears another run's progress and records this run's identity (atomically: resuming reads it)."""
    identity_file = progress_dir / IDENTITY_FILE
    same_run = identity_file.is_file() and json.loads(identity_file.read_text()) == identity
    resume_from = last_complete_save(progress_dir) if same_run else None
    state.wait_for_everyone()  # every rank has decided before rank 0 changes the folder
    if state.is_main_process:
        if not same_run:
            shutil.rmtree(progress_dir, ignore_errors=True)
        progress_dir.mkdir(parents=True, exist_ok=True)
        prune_incomplete_saves(progress_dir)
        atomic_write_text(identity_file, json.dumps(identity))
    state.wait_for_everyone()
    return resume_from


def _lora_config(hp: TrainingHyperparameters):
    """PEFT's LoRA config when ``lora_r > 0``, else None (full fine-tuning)."""
    if hp.lora_r <= 0:
        return None
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise RuntimeError("lora_r > 0 needs peft: pip install 'srt-assets[lora]'") from exc
    return LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def _publish(trainer, tokenizer, state, out_dir: Path, manifest: dict, merge: bool) -> None:
    """Save the model (LoRA merged into plain weights) with its tokenizer and manifest beside
    ``out_dir`` and rename it into place, so a checkpoint is never half-written."""
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    if merge:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if state.is_main_process:
            merged.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # every rank takes part (FSDP/DeepSpeed gather the weights)
    if state.is_main_process:
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)

"""Stage 7: the student fine-tuned on each training dataset of a source (selected, random, full)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from srt_assets.core.cache import content_key
from srt_assets.core.datasets import TRAINING_SETS
from srt_assets.core.ifd import ScoringConfig
from srt_assets.core.training import MANIFEST, finished_training, read_manifest, run_identity, sft_examples
from srt_assets.defs.common import GPU_STEP, production_figures, table_value
from srt_assets.defs.partitions import SOURCES
from srt_assets.models.sft_launch import write_job
from srt_assets.models.student import build_text_builder, load_tokenizer
from srt_assets.plots import text_curve
from srt_assets.resources import ComputeResource, StorageResource, StudentModelResource, TrainingResource


def checkpoint_key(dataset: str) -> AssetKey:
    """``finetuned_<dataset>``: one asset per training dataset, so each checkpoint has exact lineage,
    reruns alone, and runs as its own step (one GPU each on a cluster executor)."""
    return AssetKey(f"finetuned_{dataset}")


CHECKPOINT_KEYS = [checkpoint_key(d) for d in TRAINING_SETS]


def checkpoint_dir(storage: StorageResource, source: str, dataset: str) -> Path:
    return storage.checkpoints_dir / source / dataset


def dataset_fingerprint(rows: pl.DataFrame) -> str:
    """Content hash of the training rows (ids and texts, in order)."""
    return content_key(rows.select("sample_id", "variant", "instruction", "input", "output").rows())


def checkpoint_asset(dataset: str) -> AssetsDefinition:
    """The checkpoint fine-tuned on one training dataset: the one factory of the graph, since these
    assets really are generated (one per entry of TRAINING_SETS)."""

    @asset(
        key=checkpoint_key(dataset),
        partitions_def=SOURCES,
        group_name="training",
        kinds={"pytorch"},
        ins={"rows": AssetIn(TRAINING_SETS[dataset])},
        description=f"The student fine-tuned on `{TRAINING_SETS[dataset]}` (loss on response tokens only): a "
        "directory `from_pretrained` loads, with a manifest of base model, data and hyperparameters. A rerun "
        "with the same inputs reuses it; an interrupted training resumes from its last save. Trained by TRL's "
        "SFTTrainer in a worker process that reports through Dagster Pipes: the worker alone for one process, "
        "under `accelerate launch` for training.processes ranks.",
        **GPU_STEP,
    )
    def finetuned(
        context: AssetExecutionContext,
        rows: pl.DataFrame,
        student: StudentModelResource,
        gpu: ComputeResource,
        storage: StorageResource,
        training: TrainingResource,
    ) -> MaterializeResult:
        return fine_tune(context, dataset, rows, CheckpointModels(student, gpu, storage, training))

    return finetuned


@dataclass(frozen=True)
class CheckpointModels:
    """The resources a checkpoint needs, passed on as one."""

    student: StudentModelResource
    gpu: ComputeResource
    storage: StorageResource
    training: TrainingResource


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A finished checkpoint: where it is, its training record, and what it was trained from."""

    out_dir: Path
    result: dict
    data_hash: str
    base: dict


def train_checkpoint(
    context: AssetExecutionContext, out_dir: Path, dataset_asset: str, rows: pl.DataFrame, models: CheckpointModels
) -> TrainedCheckpoint:
    """Reuse the identical finished checkpoint in ``out_dir``, or train it (resuming from its last
    save): the one training path of every checkpoint, the assets' and the seed repeats'."""
    student, storage, training = models.student, models.storage, models.training
    source = context.partition_key
    base = student.identity_in(storage)
    tokenizer = load_tokenizer(base.path)
    builder = build_text_builder(tokenizer, student.template, ScoringConfig(max_length=training.max_length))
    examples = sft_examples(builder, rows.select("instruction", "input", "output").rows(), tokenizer.eos_token_id)
    if not examples:
        raise ValueError(f"dataset '{dataset_asset}' of source '{source}' has no trainable rows")
    data_hash = dataset_fingerprint(rows)
    identity = run_identity(base.fingerprint, data_hash, student.template, training, training.processes)
    result = finished_training(out_dir, identity)
    if result:
        context.log.info(f"an identical finished checkpoint exists in {out_dir}: reused, no training")
    else:
        device = models.gpu.resolved_device()
        context.log.info(
            f"fine-tuning on {len(examples)} rows of {dataset_asset}[{source}] → {out_dir} "
            f"({training.processes} process(es), {training.launcher})"
        )
        job_dir = write_job(
            out_dir.with_name(f".{out_dir.name}.job"),
            model_path=base.path,
            examples=examples,
            hp=training,
            out_dir=out_dir,
            identity=identity,
            device=device,
            dtype=models.gpu.dtype,
            manifest_extra={
                "base_model": student.model,
                "dataset_asset": dataset_asset,
                "source": source,
                "rows": rows.height,
            },
        )
        result = training.launch(context, job_dir, on_gpu=device != "cpu")
        shutil.rmtree(job_dir, ignore_errors=True)
    return TrainedCheckpoint(out_dir, result, data_hash, {"model": student.model, "fingerprint": base.fingerprint})


def fine_tune(context: AssetExecutionContext, dataset: str, rows: pl.DataFrame, models: CheckpointModels):
    """The checkpoint asset's body: train (or reuse) and report it."""
    out_dir = checkpoint_dir(models.storage, context.partition_key, dataset)
    trained = train_checkpoint(context, out_dir, TRAINING_SETS[dataset], rows, models)
    dataset_facts = {"asset": TRAINING_SETS[dataset], "fingerprint": trained.data_hash, "rows": rows.height}
    return MaterializeResult(
        metadata=checkpoint_metadata(context, dataset, out_dir, trained.result, models, dataset_facts, trained.base)
    )


def checkpoint_metadata(
    context: AssetExecutionContext,
    dataset: str,
    out_dir: Path,
    result: dict,
    models: CheckpointModels,
    dataset_facts: dict,
    base_facts: dict,
) -> dict:
    """What the checkpoint shows: where it is, what it was trained on and how, and its loss curve."""
    training = models.training
    figures = {
        "wall_seconds": result["seconds"],
        "tokens_per_second": round(result["tokens_trained"] / max(result["seconds"], 1e-9), 1),
        "processes": result["processes"],
        "compute": table_value(models.gpu.describe()),
    }
    losses = result["losses"]
    launch = {"processes": training.processes, "accelerate_config": training.accelerate_config}
    return {
        "path": MetadataValue.path(str(out_dir)),
        "manifest": MetadataValue.path(str(out_dir / MANIFEST)),
        "dataset": table_value(dataset_facts),
        "base_model": table_value(base_facts),
        "hyperparameters": table_value(training.as_dict()),
        "launch": table_value(launch | {"launcher": training.launcher}),
        "steps": result["steps"],
        "final_loss": losses[-1] if losses else None,
        "tokens_trained": result["tokens_trained"],
        "response_tokens_per_epoch": result["target_tokens"],
        "resumed_from_step": result["resumed_from_step"],
        "reused_existing": result["reused"],
        **production_figures(context, checkpoint_key(dataset), not result["reused"], figures),
        "loss_curve": MetadataValue.md(text_curve(losses, "step", "training loss")),
    }


finetuned_selected = checkpoint_asset("selected")
finetuned_random = checkpoint_asset("random")
finetuned_full = checkpoint_asset("full")
finetuned_teacher = checkpoint_asset("teacher")
CHECKPOINTS = [finetuned_selected, finetuned_random, finetuned_full, finetuned_teacher]  # one per TRAINING_SETS entry


def checkpoint_manifests(storage: StorageResource, source: str) -> dict[str, dict | None]:
    """Each checkpoint's training manifest (None where it is not trained yet)."""
    return {dataset: read_manifest(checkpoint_dir(storage, source, dataset)) for dataset in TRAINING_SETS}

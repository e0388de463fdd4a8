"""The training launcher and worker.

``python -m srt_assets.models.sft_launch launch <accelerate launch arguments>`` is ``accelerate
launch`` bound to the process that started it, and ``python -m srt_assets.models.sft_launch JOB_DIR``
is the worker it starts once per rank, bound to the launcher. Bound means killed with it: torch's
launcher starts every rank in a session of its own, so without this a ``kill -9`` of the Dagster step
(or of the launcher) leaves the ranks training on, and writing the same progress folder as the rerun.

``JOB_DIR`` holds ``job.json`` (model, hyperparameters, identity, output folder, device) and
``examples.parquet`` (token ids and first response position per row), written by the checkpoint
asset (``write_job``). Rank 0 talks to Dagster through Pipes when it was started by Dagster: a log
line per optimizer step, then the materialization with the run's metrics. Started by hand (no
Pipes), it prints the same to stdout.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import polars as pl

from srt_assets.core.files import atomic_write_text, write_parquet_atomic
from srt_assets.core.training import TrainingHyperparameters

JOB_FILE = "job.json"
EXAMPLES_FILE = "examples.parquet"


def write_job(
    job_dir: Path,
    *,
    model_path: str,
    examples: list[tuple[tuple[int, ...], int]],
    hp: TrainingHyperparameters,
    out_dir: Path,
    identity: dict,
    device: str,
    dtype: str,
    manifest_extra: dict,
) -> Path:
    """Everything a worker needs, on disk where every rank (and a Kubernetes pod on shared
    storage) can read it."""
    table = pl.DataFrame(
        {"input_ids": [list(ids) for ids, _ in examples], "response_start": [start for _, start in examples]},
        schema={"input_ids": pl.List(pl.Int64), "response_start": pl.Int64},
    )
    write_parquet_atomic(table, job_dir / EXAMPLES_FILE)
    job = {
        "model_path": model_path,
        "hyperparameters": hp.as_dict(),
        "out_dir": str(out_dir),
        "identity": identity,
        "device": device,
        "dtype": dtype,
        "manifest_extra": manifest_extra,
    }
    atomic_write_text(job_dir / JOB_FILE, json.dumps(job, indent=1))
    return job_dir


def run(job_dir: Path) -> None:
    from accelerate import PartialState
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from srt_assets.models.trainer import train_sft

    job = json.loads((job_dir / JOB_FILE).read_text())
    table = pl.read_parquet(job_dir / EXAMPLES_FILE)
    examples = list(zip(table["input_ids"].to_list(), table["response_start"].to_list(), strict=True))
    hp = TrainingHyperparameters(**job["hyperparameters"])
    rank0 = PartialState(cpu=job["device"] == "cpu").is_main_process

    def train(log: Callable[[str], object]) -> dict:
        result = train_sft(
            job["model_path"],
            examples,
            hp,
            Path(job["out_dir"]),
            job["identity"],
            device=job["device"],
            dtype=job["dtype"],
            on_step=lambda step, total, loss: log(f"step {step}/{total}: loss {loss:.4f}"),
            manifest_extra=job["manifest_extra"],
        )
        return {**asdict(result), "final_loss": result.final_loss}

    if rank0 and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            pipes.report_asset_materialization(metadata=train(pipes.log.info))
    else:
        metrics = train(print)
        if rank0:
            print(json.dumps(metrics))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (elsewhere: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> None:
    die_with_parent()
    if argv[:1] == ["launch"]:
        from accelerate.commands.launch import main as accelerate_launch

        sys.argv = ["accelerate launch", *argv[1:]]
        accelerate_launch()
    else:
        run(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])

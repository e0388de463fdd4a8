"""Training as the checkpoint asset launches it: TRL's SFTTrainer under `accelerate launch`, here
with two gloo processes on CPU. Two processes follow the loss trajectory of one process with the
same global batch, a two-process training killed with SIGKILL resumes from its last save, and the
shipped multi-GPU settings are accepted by accelerate's own launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, alpaca_rows, training_examples, write_catalog, write_jsonl
from dagster._core.instance.ref import InstanceRef
from dagster_ui import MATERIALIZATION_METADATA, dagster_dev, graphql, run_partition, wait_for_location

from srt_assets.core.training import (
    MANIFEST,
    SHIPPED_ACCELERATE_CONFIGS,
    TrainingHyperparameters,
    accelerate_config_path,
    launch_command,
    run_identity,
)
from srt_assets.models.sft_launch import write_job
from srt_assets.resources import TrainingResource
from srt_assets.settings_file import resources_from_file

# 8 rows, global batch 2, 2 epochs: 8 optimizer steps, a resumable save after step 4
HP = TrainingHyperparameters(learning_rate=2e-4, epochs=2, batch_size=1, max_length=128, warmup_ratio=0.0, save_every=4)
TOLERANCE = 1e-4  # relative, per step: the ranks sum the same tokens in another order


@pytest.fixture(scope="module")
def examples(student_model_dir):
    return training_examples(student_model_dir, HP.max_length, 6, with_input=2)


def start(student_model_dir, examples, hp, processes: int, out: Path) -> subprocess.Popen:
    job = write_job(
        out.with_name(out.name + ".job"), model_path=str(student_model_dir), examples=examples, hp=hp,
        out_dir=out, identity=run_identity("base", "data", "chat", hp, processes), device="cpu",
        dtype="float32", manifest_extra={},
    )  # fmt: skip
    log = out.with_name(out.name + ".log").open("a")
    command = launch_command(job, processes, None, on_gpu=False)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def train(student_model_dir, examples, hp, processes: int, out: Path) -> dict:
    process = start(student_model_dir, examples, hp, processes, out)
    assert process.wait(timeout=900) == 0, out.with_name(out.name + ".log").read_text()[-4000:]
    return json.loads((out / MANIFEST).read_text())["training"]


def ranks_running(job_dir: Path) -> bool:
    """Whether any process is still working on ``job_dir``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(job_dir).encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def wait_until(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def two_processes(student_model_dir, examples, tmp_path_factory) -> dict:
    return train(student_model_dir, examples, HP, 2, tmp_path_factory.mktemp("ddp") / "ckpt")


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(two_processes, student_model_dir, examples, tmp_path):
    one = train(student_model_dir, examples, HP.model_copy(update=dict(grad_accumulation=2)), 1, tmp_path / "one")
    assert two_processes["processes"] == 2 and one["processes"] == 1
    assert two_processes["steps"] == one["steps"] == 8 and len(two_processes["losses"]) == 8
    assert two_processes["losses"] == pytest.approx(one["losses"], rel=TOLERANCE)
    assert two_processes["tokens_trained"] == one["tokens_trained"] > 0  # both ranks' tokens counted
    assert two_processes["losses"][-1] < two_processes["losses"][0]  # and it learned


@pytest.mark.slow
def test_a_killed_two_process_training_resumes_from_its_last_save(two_processes, student_model_dir, examples, tmp_path):
    out = tmp_path / "ckpt"
    progress = tmp_path / ".ckpt.progress"
    process = start(student_model_dir, examples, HP, 2, out)
    deadline = time.monotonic() + 600
    while not (progress / "checkpoint-4" / "trainer_state.json").is_file():
        assert process.poll() is None, out.with_name("ckpt.log").read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher, mid-training: its ranks must die with it
    process.wait(timeout=60)
    assert wait_until(lambda: not ranks_running(out.with_name("ckpt.job"))), "ranks outlived their launcher"
    assert not out.exists()
    resumed = train(student_model_dir, examples, HP, 2, out)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    assert resumed["losses"] == pytest.approx(two_processes["losses"], rel=TOLERANCE)
    assert not progress.exists()  # progress saves are removed once the checkpoint is written


def test_resume_takes_the_newest_complete_save_and_drops_cut_ones(tmp_path):
    from srt_assets.models.trainer import last_complete_save, prune_incomplete_saves

    for step, complete in ((2, True), (4, True), (6, False)):  # step 6 was being written when killed
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_save(tmp_path) == tmp_path / "checkpoint-4"
    prune_incomplete_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_the_launch_command_follows_the_training_resource(tmp_path):
    cpu = launch_command(tmp_path, 2, None, on_gpu=False)
    assert cpu[1:4] == ["-m", "srt_assets.models.sft_launch", "launch"] and "--multi_gpu" in cpu
    assert cpu[cpu.index("--num_processes") + 1] == "2"
    assert cpu[-3:] == ["-m", "srt_assets.models.sft_launch", str(tmp_path)]
    assert cpu[cpu.index("--num_cpu_threads_per_process") + 1] == str(max(1, (os.cpu_count() or 1) // 2))
    # one process needs no launcher: the worker itself, still bound to its parent and talking Pipes
    assert launch_command(tmp_path, 1, None, on_gpu=False) == [sys.executable, *cpu[-3:]]
    fsdp = launch_command(tmp_path, 8, "fsdp_full_shard", on_gpu=True)
    assert fsdp[fsdp.index("--config_file") + 1] == str(accelerate_config_path("fsdp_full_shard"))
    with pytest.raises(FileNotFoundError, match="not one of ddp, fsdp_full_shard"):
        launch_command(tmp_path, 8, "fsdp_typo", on_gpu=True)
    with pytest.raises(ValueError, match="at least 1"):
        launch_command(tmp_path, 0, None, on_gpu=True)


@pytest.mark.parametrize("name", SHIPPED_ACCELERATE_CONFIGS)
def test_accelerate_accepts_the_shipped_configs(name, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(accelerate_config_path(name)))
    assert config.mixed_precision == "bf16" and config.num_machines == 1
    command = launch_command(tmp_path, 8, name, on_gpu=True)
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(command[4:]))
    assert args.num_processes == 8 and defaults.distributed_type.value == config.distributed_type.value
    expected = {"ddp": "MULTI_GPU", "fsdp_full_shard": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected


@pytest.mark.parametrize(
    ("settings", "processes", "accelerate_config"),
    [("paper_fsdp_8gpu.yaml", 8, "fsdp_full_shard"), ("lora_1gpu_7b.yaml", 1, None)],
)
def test_shipped_training_settings_keep_the_papers_global_batch(settings, processes, accelerate_config):
    resources = resources_from_file(REPO_ROOT / "configs" / "training" / settings)
    training = resources["training"]
    assert isinstance(training, TrainingResource)
    assert training.batch_size * training.grad_accumulation * training.processes == 128
    assert (training.processes, training.accelerate_config) == (processes, accelerate_config)
    assert training.max_length == 2048 and training.epochs == 3 and training.gradient_checkpointing
    assert resources["gpu"].dtype == "bfloat16"


def test_the_k8s_launcher_asks_for_one_gpu_per_process(tmp_path):
    from dagster_k8s.pipes import build_pod_body

    training = TrainingResource(processes=4, launcher="k8s", k8s_image="srt:latest", accelerate_config="ddp")
    command = launch_command(tmp_path, training.processes, training.accelerate_config, True, python="python")
    pod = build_pod_body("srt-train", training.k8s_image, command, {}, None, training.k8s_pod_spec())
    container = pod.spec.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "4"}
    assert container.image == "srt:latest"
    assert container.command[:4] == ["python", "-m", "srt_assets.models.sft_launch", "launch"]
    assert container.command[container.command.index("--num_processes") + 1] == "4"


def checkpoint_inputs(root: Path, student_model_dir, **training) -> dict[str, str]:
    """A source whose selected_dataset table is already on disk, and a models file that trains the
    bundled student with two processes: the environment of a user who runs only the checkpoint."""
    import polars as pl

    rows = alpaca_rows(3, with_input=1)
    write_catalog(root, {"tiny": {"path": str(write_jsonl(root / "tiny.jsonl", rows))}})
    (root / "data" / "selected_dataset").mkdir(parents=True)
    pl.DataFrame(
        {
            "sample_id": [f"tiny-{i}" for i in range(len(rows))],
            "variant": ["ori"] * len(rows),
            **{field: [r[field] for r in rows] for field in ("instruction", "input", "output")},
        }
    ).write_parquet(root / "data" / "selected_dataset" / "tiny.parquet")
    models = {
        "student": {"model": str(student_model_dir)},
        "gpu": {"device": "cpu"},
        "training": {"processes": 2, "max_steps": 2, "batch_size": 1, "max_length": 128, **training},
    }
    (root / "models.yaml").write_text(yaml.safe_dump(models), encoding="utf-8")
    return {
        "SRT_SOURCES_FILE": str(root / "sources.yaml"),
        "SRT_STORAGE_DIR": str(root / "data"),
        "SRT_MODELS_FILE": str(root / "models.yaml"),
    }


def assert_two_process_checkpoint(root: Path, metadata: dict, steps: int = 2) -> None:
    manifest = json.loads((root / "data" / "checkpoints" / "tiny" / "selected" / MANIFEST).read_text())
    assert manifest["training"]["processes"] == 2 and manifest["identity"]["processes"] == 2
    assert metadata["processes"] == 2 and metadata["steps"] == steps  # reported by rank 0 through Pipes
    assert metadata["final_loss"] == pytest.approx(manifest["final_loss"])
    assert metadata["reused_existing"] is False


@pytest.mark.slow
def test_the_cli_run_killed_mid_training_takes_its_ranks_along_and_resumes(tmp_path, student_model_dir):
    """`srt materialize` of the two-process checkpoint, killed with SIGKILL after the first save:
    the launcher and both ranks die with it, and the rerun resumes from that save."""
    from dagster import AssetKey, DagsterInstance

    env = checkpoint_inputs(tmp_path, student_model_dir, max_steps=8, save_every=4)
    env = {**os.environ, **env, "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    command = [sys.executable, "-m", "srt_assets.cli", "materialize", "--source", "tiny"]
    command += ["--select", "finetuned_selected"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = tmp_path / "data" / "checkpoints" / "tiny" / ".selected.job"
    saved = job.with_name(".selected.progress") / "checkpoint-4" / "trainer_state.json"
    assert wait_until(lambda: saved.is_file() or first.poll() is not None, 600) and first.poll() is None
    first.kill()  # SIGKILL to the Dagster process alone, as a crash or an OOM kill would
    first.wait(timeout=60)
    assert wait_until(lambda: not ranks_running(job)), "the training outlived the Dagster process"

    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    with DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"])) as instance:
        event = instance.get_latest_materialization_event(AssetKey("finetuned_selected"))
        metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
        logs = [e.message for e in instance.all_logs(event.run_id)]
    assert_two_process_checkpoint(tmp_path, metadata, steps=8)
    assert metadata["resumed_from_step"] == 4
    assert any("step 8/8: loss" in message for message in logs)  # rank 0's log lines, through Pipes
    assert not any("step 4/8: loss" in message for message in logs)  # steps before the save are not redone


@pytest.mark.slow
def test_the_checkpoint_asset_trains_with_two_processes_from_the_ui(tmp_path, student_model_dir):
    env = checkpoint_inputs(tmp_path, student_model_dir)
    with dagster_dev(tmp_path, **env) as port:
        assert wait_for_location(port)["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        status = run_partition(port, "tiny", ["finetuned_selected"])
        assert status == "SUCCESS", (tmp_path / "webserver.log").read_text()[-4000:]
        nodes = graphql(port, MATERIALIZATION_METADATA, {"keys": [{"path": ["finetuned_selected"]}]})
    entries = nodes["data"]["assetNodes"][0]["assetMaterializations"][0]["metadataEntries"]
    metadata = {e["label"]: v for e in entries for k, v in e.items() if k != "label"}  # the numeric entries
    assert_two_process_checkpoint(tmp_path, metadata)

"""The scale-out path as configuration: every model step is in the `gpu` pool and asks the
Kubernetes and Celery executors for one GPU, the executors chosen by SRT_EXECUTOR accept their
configuration, and the instance caps the pool. tests/test_cluster.py runs the Celery path for real."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT
from dagster import validate_run_config
from test_asset_graph import gpu_steps as snapshot_gpu_steps

from srt_assets.definitions import build_definitions


def gpu_steps(defs) -> dict[str, object]:
    """Asset name → its op (node) definition, for every asset in the gpu pool."""
    steps = {}
    for assets_def in defs.assets:
        node = assets_def.node_def
        if getattr(node, "pool", None) == "gpu":
            for key in assets_def.keys:
                steps[key.to_user_string()] = node
    return steps


def test_every_model_step_asks_for_one_gpu():
    from dagster_k8s.job import get_user_defined_k8s_config

    steps = gpu_steps(build_definitions())
    assert set(steps) == snapshot_gpu_steps()  # the reviewed graph snapshot names the model steps
    for name, node in steps.items():
        k8s = get_user_defined_k8s_config(node.tags)  # parsed the way the k8s executor parses it
        assert k8s.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert node.tags["dagster-celery/queue"] == "gpu", name


@pytest.mark.parametrize("executor", ["k8s", "celery", "multiprocess"])
def test_cluster_executors_accept_their_configuration(executor, monkeypatch):
    monkeypatch.setenv("SRT_GPU_SLOTS", "4")
    defs = build_definitions(executor=executor)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == executor
    resolved = validate_run_config(job, {})["execution"][executor]  # configured defaults pass the schema
    if executor == "celery":
        assert resolved["broker"]
    else:
        assert {"key": "srt/accelerator", "value": "gpu", "limit": 4} in resolved["tag_concurrency_limits"]


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ValueError, match="SRT_EXECUTOR='slurm'"):
        build_definitions(executor="slurm")


def test_instance_caps_the_gpu_pool():
    settings = yaml.safe_load((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    assert settings["concurrency"]["pools"]["default_limit"] == 1

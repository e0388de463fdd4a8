"""What every teacher backend shares: the sampling and reflection settings, the model identity that
cache keys use, and a session that puts the durable call cache in front of a backend loaded on the
first cache miss.

A backend is one settings class (its own fields, ``model_id`` and ``build``) in its own module;
``srt_assets/resources.py`` turns each into a Dagster resource with one line. The judge is a teacher
too (any backend), configured separately.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from srt_assets.core.cache import open_cache
from srt_assets.core.generation import CachedGenerator, ChatModel, Generation, GenerationParams, Messages, OnDone
from srt_assets.core.reflection import ReflectionPrompts
from srt_assets.core.teacher import ReflectionSettings
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.identity import BUNDLED_MODEL, model_identity

SMALL_TEACHER_PROMPTS = Path(__file__).resolve().parent.parent / "prompts" / "small_teacher.yaml"


class ChatModelSettings(BaseModel, ABC):
    """Sampling and reflection settings of any teacher (the authors: temperature 0, top_p 1, up to
    2048 tokens, with ChatGPT)."""

    backend: ClassVar[str]  # the name used in configuration files and metadata
    streams: ClassVar[bool] = False  # True: takes any number of calls at once and reports each as it ends
    submits_ahead: ClassVar[bool] = False  # True: queues calls to run later (``submit``), the Batch API

    temperature: float = Field(0.0, description="sampling temperature (the authors: 0)")
    top_p: float = Field(1.0, description="nucleus sampling (the authors: 1)")
    max_tokens: int = Field(
        128, description="per reply; small for the embedded CPU default (the paper: up to 2048, ChatGPT)"
    )
    parse_retries: int = Field(1, description="extra calls, at a higher temperature, after an unparsable reply")
    structured_output: bool = Field(False, description="ask for JSON through the backend's guided decoding")
    mode: Literal["eager", "lazy"] = Field(
        "eager", description="eager: reflect the responses of ori and Q (authors); lazy: only the branch kept"
    )
    max_prompt_chars: int = Field(
        64_000,
        gt=0,
        description="longest prompt sent, in characters (about 4 per token in English): a longer one is not "
        "sent and its row ends call_failed (prompt_too_long) with the original texts",
    )
    prompts_file: str = Field(
        "auto",
        description="YAML with prompt texts (keys of ReflectionPrompts); 'auto': the compact prompts for the "
        "bundled 135M teacher, the full (analysis-first) prompts for any other; '': the full prompts",
    )

    @abstractmethod
    def model_id(self, models_dir: Path, compute: ComputeSettings) -> str:
        """The identity of the model behind the calls: part of every cache key (never a secret)."""

    @abstractmethod
    def build(
        self, compute: ComputeSettings, models_dir: Path, model_id: str, *, cache_location: str | Path | None = None
    ) -> ChatModel:
        """The backend itself (loads a model or opens a client); called on the first cache miss.
        ``cache_location`` is the call cache's database, for a backend that keeps state of its own
        there (the Batch API's ledger of submitted batches)."""

    def is_small_bundled_model(self) -> bool:
        """Whether 'auto' prompts should be the compact, prefilled ones (the bundled 135M model)."""
        return False

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Money spent on the tokens, where the backend has a price; local models cost none."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """What may be shown in the UI: the backend's own fields (no field holds a key)."""
        return {"backend": self.backend} | {
            name: value for name, value in self.model_dump().items() if name in type(self).model_fields
        }

    def prompts_path(self) -> str:
        if self.prompts_file != "auto":
            return self.prompts_file
        return str(SMALL_TEACHER_PROMPTS) if self.is_small_bundled_model() else ""

    def reflection_settings(self) -> tuple[ReflectionPrompts, ReflectionSettings]:
        file = self.prompts_path()
        prompts = ReflectionPrompts.from_file(file) if file else ReflectionPrompts()
        params = GenerationParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)
        return prompts, ReflectionSettings(
            params=params, parse_retries=self.parse_retries, structured=self.structured_output
        )

    @contextmanager
    def open_session(
        self,
        compute: ComputeSettings,
        models_dir: Path,
        cache_location: str | Path,
        progress: Callable[[int, int], None] | None = None,
        chunk_size: int = 64,
    ) -> Iterator[CachedGenerator]:
        """This teacher behind the durable call cache: the backend is built on the first cache miss
        and released on exit."""
        model_id = self.model_id(models_dir, compute)
        backend = LazyChatModel(
            model_id,
            lambda: self.build(compute, models_dir, model_id, cache_location=cache_location),
            self.streams,
            self.submits_ahead,
        )
        cache = open_cache(cache_location, "teacher_calls")
        try:
            yield CachedGenerator(
                backend, cache, chunk_size=chunk_size, progress=progress, max_prompt_chars=self.max_prompt_chars
            )
        finally:
            backend.close()
            cache.close()


class LocalChatModelSettings(ChatModelSettings, ABC):
    """A teacher whose weights this process loads: the cache identity is the weights' fingerprint."""

    model: str = Field(BUNDLED_MODEL, description="'bundled:smollm2-135m-instruct', a model directory or hub id")

    def model_id(self, models_dir: Path, compute: ComputeSettings) -> str:
        """The weights' fingerprint and the precision they generate in (replies differ by precision)."""
        fingerprint = model_identity(self.model, models_dir).fingerprint
        return f"{self.backend}:{fingerprint}|{compute.resolved_generation_dtype()}"

    def model_path(self, models_dir: Path) -> str:
        return model_identity(self.model, models_dir).path

    def is_small_bundled_model(self) -> bool:
        return self.model == BUNDLED_MODEL


class LazyChatModel:
    """Builds the backend on the first cache miss: a rerun served from the cache loads no model."""

    def __init__(
        self, model_id: str, build: Callable[[], ChatModel], streams: bool = False, submits_ahead: bool = False
    ):
        self.model_id = model_id
        self.streams, self.submits_ahead = streams, submits_ahead  # what the cached session may ask of it
        self._build = build
        self._backend: ChatModel | None = None
        self.was_loaded = False  # whether any call needed the model (kept after close, for metadata)

    def _loaded(self) -> ChatModel:
        if self._backend is None:
            self._backend = self._build()
            self.was_loaded = True
        return self._backend

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        return self._loaded().generate(conversations, params, on_done)

    def submit(self, conversations: Sequence[Messages], params: GenerationParams) -> None:
        """Queue calls at a backend that runs them later (``submits_ahead``); ``generate`` collects them."""
        self._loaded().submit(conversations, params)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._backend is not None and hasattr(self._backend, "close"):
            self._backend.close()
        self._backend = None

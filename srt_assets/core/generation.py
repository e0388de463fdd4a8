"""What every model that writes text shares, whoever it answers for (the teacher, the judge, a
fine-tuned checkpoint): sampling parameters, one call's result, the chat and text interfaces, and
the durable call cache in front of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from srt_assets.core.cache import CallCache, content_key

Messages = list[dict[str, str]]  # a chat: {"role", "content"} turns, as every chat API takes them


def continues_reply(messages: Messages) -> str:
    """The prefilled start of the reply when the conversation ends with an assistant turn, else ''."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    json_schema: dict | None = None  # structured output through the backend's guided decoding
    seed: int = 0


@dataclass
class Generation:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the call failed for good (after the backend's own retries)
    error_kind: str | None = None  # timeout | rate_limited | unusable_reply | deadline | prompt_too_long | ...
    attempts: int = 1  # requests sent for this call (retries and failover included)
    finish_reason: str | None = None  # "stop", or "length" when the reply ran out of tokens

    @property
    def usable(self) -> bool:
        """A reply worth keeping: no error and some text. Only these are cached."""
        return self.error is None and self.text is not None


OnDone = Callable[[int, Generation], None]


def call_key(model_id: str, messages: Messages, params: GenerationParams) -> str:
    """The cache key of one call. Defined once: the Batch API backend names each request with it
    (``custom_id``), so its replies land under exactly the keys the pipeline reads."""
    return content_key(model_id, messages, asdict(params))


class ChatModel(Protocol):
    """Turns chat conversations into replies. ``on_done(i, generation)`` is called as each call
    finishes (any order), so its caller can store it before the others are done."""

    model_id: str

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]: ...


@dataclass
class CallStats:
    calls: int = 0
    cache_hits: int = 0
    requests: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CachedGenerator:
    """Wraps a backend with the durable call cache. Only usable replies are cached, so a failed call
    is tried again on the next run; each reply is stored the moment its call finishes, so a crash
    loses at most the calls in flight."""

    def __init__(
        self,
        backend: ChatModel,
        cache: CallCache,
        chunk_size: int = 64,
        progress: Callable | None = None,
        max_prompt_chars: int | None = None,
    ):
        self.backend = backend
        self.cache = cache
        self.chunk_size = chunk_size
        self.progress = progress
        self.max_prompt_chars = max_prompt_chars  # None: our own prompts only (held-out sets), no bound
        self.stats = CallStats()

    def over_budget(self, messages: Messages) -> Generation | None:
        """The failure of a call whose prompt is over ``max_prompt_chars``: it is never sent (an
        endpoint bills up to its context for it, a local model pads a whole batch to it)."""
        size = sum(len(m["content"]) for m in messages)
        if self.max_prompt_chars is None or size <= self.max_prompt_chars:
            return None
        return Generation(
            text=None,
            error=f"the prompt has {size:,} characters, over the teacher's max_prompt_chars of "
            f"{self.max_prompt_chars:,}; not sent",
            error_kind="prompt_too_long",
            attempts=0,
        )

    def key(self, messages: Messages, params: GenerationParams) -> str:
        return call_key(self.backend.model_id, messages, params)

    @property
    def submits_ahead(self) -> bool:
        """Whether the backend queues calls to run later (the Batch API): see ``submit_ahead``."""
        return bool(getattr(self.backend, "submits_ahead", False))

    def submit_ahead(self, conversations: Sequence[Messages], params: GenerationParams) -> int:
        """Hand calls to a backend that queues them, without waiting for replies, so that a stage
        can queue every block before it waits on the first; a later ``generate`` of the same calls
        collects them. Cached and over-budget calls are not sent. Returns the calls handed over."""
        if not self.submits_ahead:
            return 0
        keys = [self.key(m, params) for m in conversations]
        known = self.cache.get_many(keys)
        todo = [m for m, k in zip(conversations, keys, strict=True) if k not in known and self.over_budget(m) is None]
        if todo:
            self.backend.submit(todo, params)  # type: ignore[attr-defined]
        return len(todo)

    def _record(self, key: str, generation: Generation) -> None:
        self.stats.calls += 1
        self.stats.requests += generation.attempts
        self.stats.prompt_tokens += generation.prompt_tokens
        self.stats.completion_tokens += generation.completion_tokens
        if generation.usable:
            self.cache.put_many({key: asdict(generation)})
        else:
            kind = generation.error_kind or "error"
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1

    def generate(self, conversations: Sequence[Messages], params: GenerationParams) -> list[tuple[str, Generation]]:
        keys = [self.key(m, params) for m in conversations]
        known = self.cache.get_many(keys)
        results: list[Generation | None] = [Generation(**known[k]) if k in known else None for k in keys]
        self.stats.cache_hits += sum(r is not None for r in results)
        for i, result in enumerate(results):
            refused = None if result is not None else self.over_budget(conversations[i])
            if refused is not None:
                results[i] = refused
                self._record(keys[i], refused)
        missing = [i for i, r in enumerate(results) if r is None]
        # A streaming backend (HTTP) gets every call at once, so its concurrency is never capped by a
        # chunk and no chunk waits for its slowest call; a batching one (local models) gets chunks.
        step = max(len(missing) if getattr(self.backend, "streams", False) else self.chunk_size, 1)
        done = 0
        for begin in range(0, len(missing), step):
            chunk = missing[begin : begin + step]
            recorded: set[int] = set()

            def on_done(position: int, generation: Generation, chunk: list[int] = chunk, recorded=recorded) -> None:
                nonlocal done
                index = chunk[position]
                results[index] = generation
                recorded.add(position)
                self._record(keys[index], generation)
                done += 1
                if self.progress:  # it decides how often to write (ThrottledProgress)
                    self.progress(done, len(missing))

            generations = self.backend.generate([conversations[i] for i in chunk], params, on_done)
            for position, generation in enumerate(generations):  # a backend that reported nothing
                if position not in recorded:
                    on_done(position, generation)
        return list(zip(keys, results, strict=True))  # type: ignore[arg-type]


class TextModel(Protocol):
    """A local engine that also continues ready-made prompt texts (a training template, say)."""

    def generate_texts(
        self, prompts: Sequence[str], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]: ...

"""The reflection driver: retries, fallbacks and outcomes around the teacher's calls.

Backends (HTTP, in-process vLLM, local transformers) only turn chat conversations into texts, and the
call cache (core/generation.py) stores every call as its chunk finishes. This module makes the step
dependable: a parse failure is retried and then recorded with the raw reply, and every row ends in a
recorded outcome with the original text as its fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from srt_assets.core.generation import CachedGenerator, GenerationParams, Messages, continues_reply
from srt_assets.core.reflection import (
    INSTRUCTION_JSON_SCHEMA,
    JSON_FORMAT_NOTE,
    RESPONSE_JSON_SCHEMA,
    Parsed,
    ReflectionPrompts,
    instruction_messages,
    parse_instruction_reflection,
    parse_response_reflection,
    parse_structured,
    response_messages,
)


@dataclass(frozen=True)
class ReflectionSettings:
    params: GenerationParams = field(default_factory=GenerationParams)
    parse_retries: int = 1  # extra calls after a parse failure
    retry_temperature: float = 0.7  # a retry must be able to differ from a greedy first reply
    structured: bool = False  # ask for JSON through guided decoding instead of markers


@dataclass
class ReflectionOutcome:
    """One row's result: the parsed texts (or the original as fallback) and how it was reached."""

    instruction: str | None
    answer: str | None
    status: str  # ok | parse_failed | call_failed
    error: str | None
    raw_text: str | None
    cache_key: str
    attempts: int  # requests sent for this row (parse retries, HTTP retries and failover included)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # of the reply the row's texts come from
    closed: bool = False  # the parsed answer ended at its closing marker, whatever came after it


def _with_format_note(messages: Messages) -> Messages:
    return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + JSON_FORMAT_NOTE}]


def reflection_calls(
    rows: Sequence[tuple[str, str, str]], kind: str, prompts: ReflectionPrompts, settings: ReflectionSettings
) -> tuple[list[Messages], GenerationParams]:
    """The first attempt's conversations and parameters for (instruction, input, output) rows: what
    ``reflect`` sends first, and what a stage queues ahead at a Batch API backend."""
    build = instruction_messages if kind == "instruction" else response_messages
    conversations = [build(prompts, *row) for row in rows]
    if not settings.structured:
        return conversations, settings.params
    schema = INSTRUCTION_JSON_SCHEMA if kind == "instruction" else RESPONSE_JSON_SCHEMA
    return [_with_format_note(m) for m in conversations], replace(settings.params, json_schema=schema)


def reflect(
    teacher: CachedGenerator,
    rows: Sequence[tuple[str, str, str]],
    kind: str,
    prompts: ReflectionPrompts,
    settings: ReflectionSettings,
) -> list[ReflectionOutcome]:
    """Instruction (``kind='instruction'``) or response (``'response'``) reflection of
    (instruction, input, output) rows. Falls back to the original texts where no usable reply came."""
    conversations, params = reflection_calls(rows, kind, prompts, settings)

    def parse(text: str) -> Parsed:
        if settings.structured:
            return parse_structured(text, kind)
        return parse_instruction_reflection(text) if kind == "instruction" else parse_response_reflection(text)

    outcomes: list[ReflectionOutcome | None] = [None] * len(rows)
    pending = list(range(len(rows)))
    usage = [[0, 0, 0] for _ in rows]  # prompt tokens, completion tokens, requests
    for attempt in range(settings.parse_retries + 1):
        if not pending:
            break
        attempt_params = (
            params
            if attempt == 0
            else replace(
                params, temperature=max(params.temperature, settings.retry_temperature), seed=params.seed + attempt
            )
        )
        replies = teacher.generate([conversations[i] for i in pending], attempt_params)
        still_pending = []
        for i, (key, generation) in zip(pending, replies, strict=True):
            usage[i][0] += generation.prompt_tokens
            usage[i][1] += generation.completion_tokens
            usage[i][2] += generation.attempts
            original_instruction = rows[i][0] if kind == "instruction" else None
            text = generation.text
            prefill = continues_reply(conversations[i])
            if text is not None and prefill:  # the reply as the parser must see it
                text = prefill + ("" if text[:1].isspace() else " ") + text
            if generation.error is not None or text is None:
                parsed, status, error = Parsed(), "call_failed", generation.error or "no reply"
            else:
                parsed = parse(text)
                status, error = ("ok", None) if parsed.ok else ("parse_failed", parsed.error)
            accepted = status == "ok"
            outcome = ReflectionOutcome(
                instruction=parsed.instruction if accepted else original_instruction,
                answer=parsed.answer if accepted else rows[i][2],
                status=status,
                error=error,
                raw_text=text,
                cache_key=key,
                attempts=usage[i][2],
                prompt_tokens=usage[i][0],
                completion_tokens=usage[i][1],
                finish_reason=generation.finish_reason,
                closed=parsed.closed,
            )
            outcomes[i] = outcome
            if status == "parse_failed":
                still_pending.append(i)
        pending = still_pending
    return outcomes  # type: ignore[return-value]

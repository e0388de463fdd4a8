"""A teacher behind any OpenAI-compatible chat-completions endpoint (hosted APIs, ``vllm serve``).

Requests run concurrently up to a limit; timeouts, 429 and 5xx are retried with exponential backoff
and full jitter, honouring ``Retry-After``; a reply that is not a valid completion is retried too.
The API key is read from the environment when the backend is built and is sent only in the
``Authorization`` header: it never appears in logs, errors, metadata or cache keys.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from srt_assets.core.reflection import Messages, continues_reply
from srt_assets.core.teacher import Generation, GenerationParams

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    backoff_base: float = 0.5  # seconds; attempt n waits up to base * 2**n (full jitter)
    max_backoff: float = 30.0
    max_retry_after: float = 120.0


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either a number of seconds or an HTTP date."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


class OpenAICompatibleTeacher:
    """``TeacherBackend`` over ``POST {base_url}/chat/completions``.

    ``base_url`` may list several replicas separated by commas (e.g. one vLLM server per GPU node):
    calls are spread round-robin over them, and a retry goes to the next replica, so one slow or
    failed server does not stall the step. ``concurrency`` is the total across replicas.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        cost_per_1k_input: float = 0.0,
        cost_per_1k_output: float = 0.0,
        rng: random.Random | None = None,
    ):
        self.base_urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        if not self.base_urls:
            raise ValueError("OpenAI-compatible teacher needs a base_url")
        self.base_url = self.base_urls[0]
        self.model = model
        self.model_id = f"openai-compatible:{model}"  # the cache key names the model, not the server
        self.concurrency = concurrency
        self.retry = retry
        self.cost_per_1k = (cost_per_1k_input, cost_per_1k_output)
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = [
            httpx.Client(
                base_url=url,
                headers=headers,
                timeout=httpx.Timeout(timeout_s),
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            )
            for url in self.base_urls
        ]
        self._next_replica = itertools.count()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.cost_per_1k[0] + completion_tokens / 1000 * self.cost_per_1k[1]

    def _payload(self, messages: Messages, params: GenerationParams) -> dict:
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
        }
        if continues_reply(messages):
            # vLLM's server (and compatible ones) continue a final assistant turn when asked to.
            payload.update({"add_generation_prompt": False, "continue_final_message": True})
        if params.json_schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reflection", "schema": params.json_schema, "strict": True},
            }
        return payload

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry.max_retry_after)
        with self._rng_lock:
            return self._rng.uniform(0, min(self.retry.max_backoff, self.retry.backoff_base * 2**attempt))

    def _one(self, messages: Messages, params: GenerationParams) -> Generation:
        last_error, last_kind = "no attempt made", "error"
        first_replica = next(self._next_replica)
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            client = self._clients[(first_replica + attempt) % len(self._clients)]
            try:
                response = client.post("/chat/completions", json=self._payload(messages, params))
            except httpx.TimeoutException:
                last_error, last_kind = "request timed out", "timeout"
            except httpx.TransportError as exc:
                last_error, last_kind = f"connection failed: {type(exc).__name__}", "connection_error"
            else:
                if response.status_code == 200:
                    try:
                        body = response.json()
                        text = body["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError("content is not a string")
                        usage = body.get("usage") or {}
                        return Generation(
                            text=text,
                            prompt_tokens=int(usage.get("prompt_tokens", 0)),
                            completion_tokens=int(usage.get("completion_tokens", 0)),
                            attempts=attempt + 1,
                        )
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        last_error, last_kind = f"invalid completion body: {type(exc).__name__}", "invalid_response"
                elif response.status_code in RETRYABLE_STATUS:
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                    last_kind = "rate_limited" if response.status_code == 429 else "server_error"
                    last_error = f"HTTP {response.status_code}"
                else:  # 4xx other than the retryable ones: the request itself is wrong
                    detail = response.text[:200].replace("\n", " ")
                    return Generation(
                        text=None,
                        error=f"HTTP {response.status_code}: {detail}",
                        error_kind="client_error",
                        attempts=attempt + 1,
                    )
            if attempt < self.retry.max_retries:
                delay = self._backoff(attempt, retry_after)
                log.info("teacher call failed (%s), retry %d in %.2fs", last_error, attempt + 1, delay)
                time.sleep(delay)
        return Generation(text=None, error=last_error, error_kind=last_kind, attempts=self.retry.max_retries + 1)

    def generate(self, conversations: Sequence[Messages], params: GenerationParams) -> list[Generation]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda messages: self._one(messages, params), conversations))

    def close(self) -> None:
        for client in self._clients:
            client.close()

"""A teacher behind any OpenAI-compatible chat-completions endpoint (hosted APIs, ``vllm serve``).

Requests go over one aiohttp connection pool with the retry policy of the official OpenAI clients
(connection errors, timeouts, 408/409/429/5xx; exponential backoff with jitter; ``Retry-After`` and
``x-should-retry`` honoured; a per-connect and per-read timeout). Not through the ``openai`` client
itself: its request building and response models cost about 1 ms of CPU per call, more than the
rest of a call against a fast server, and a teacher stage makes millions of calls. On top of that:

- a cap on concurrent calls (a semaphore over every replica);
- an overall deadline per call, retries and failover included (``deadline_s``), so a server that
  trickles bytes cannot hold a call open;
- failover over several replicas (``base_url`` lists them, comma-separated): each call starts at the
  next replica in turn and moves on when one fails; a replica that failed is tried last for a while;
- turning every reply that cannot be used (no choices, empty content, a body that is not a
  completion, an undecodable or oversized body) into that call's failure with a reason, asked again
  up to ``max_retries`` times, and never cached;
- counting the requests each call made, and keeping the API key out of every error text.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import email.utils
import html
import json
import logging
import os
import random
import ssl
import time
import unicodedata
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator

from srt_assets.core.generation import Generation, GenerationParams, Messages, OnDone, continues_reply
from srt_assets.models.chat_model import ChatModelSettings
from srt_assets.models.compute import ComputeSettings

log = logging.getLogger(__name__)
REPLICA_COOLDOWN_S = 30.0  # how long a failed replica goes to the back of the line
_requests_of_call: contextvars.ContextVar[list[int]] = contextvars.ContextVar("srt_requests_of_call")


class OpenAIChatSettings(ChatModelSettings):
    """Any OpenAI-compatible ``/chat/completions`` endpoint. The key is read at run time from the
    environment variable that ``api_key_env`` names: a key never becomes resource or run config, which
    every UI viewer and the run storage see (a literal ``api_key`` there is refused as an unknown field)."""

    backend = "openai"
    streams = True

    model: str = Field(description="the served model name, e.g. meta-llama/Llama-3.1-70B-Instruct")
    base_url: str = Field(description="base URL, e.g. http://127.0.0.1:8000/v1; several replicas comma-separated")
    api_key_env: str = Field("SRT_TEACHER_API_KEY", description="environment variable holding the key (never the key)")
    concurrency: int = Field(8, description="calls in flight at once, over all replicas")
    timeout_s: float = Field(60.0, description="longest wait for one request's response (the client's timeout)")
    deadline_s: float = Field(300.0, description="longest one call may take, retries and failover included")
    max_retries: int = Field(
        5, description="the client's retries of a failed request, and re-asks after an unusable reply"
    )
    cost_per_1k_input: float = Field(0.0, description="price per 1,000 prompt tokens, for the cost estimate")
    cost_per_1k_output: float = Field(0.0, description="price per 1,000 completion tokens")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        """Resource config reaches every UI viewer and the run storage: a URL carrying a key would
        leak it (and httpx would send userinfo as Basic auth, a query would mangle the path)."""
        # any of these characters, anywhere (a comma in a password splits it into two "replicas"),
        # can only mean userinfo, a query, a fragment or path parameters: never needed for a server
        smuggling = set(value) & URL_SECRET_CARRIERS
        for url in replica_urls(value):
            parts = urlsplit(url)
            if smuggling or parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError(
                    "base_url must not carry credentials or a query (user:password@, ?api-key=...): it is shown "
                    "in the UI and stored with every run; put the key in an environment variable named by api_key_env"
                )
        return value

    def model_id(self, models_dir: Path, compute: ComputeSettings | None = None) -> str:
        return f"openai-compatible:{self.model}"  # the cache key names the model, not the server

    def describe(self) -> dict[str, Any]:
        """As the base says, with credentials in the URLs (user:password@, ?key=) left out."""
        return super().describe() | {"base_url": ",".join(public_url(u) for u in replica_urls(self.base_url))}

    def resolved_api_key(self) -> str | None:
        """The key, without the whitespace a pasted key or a ``.env`` line ends with (a header
        cannot carry a newline)."""
        return (os.environ.get(self.api_key_env) or "").strip() or None

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.cost_per_1k_input + completion_tokens / 1000 * self.cost_per_1k_output

    def build(
        self, compute: ComputeSettings, models_dir: Path, model_id: str, *, cache_location: str | Path | None = None
    ) -> OpenAICompatibleModel:
        return OpenAICompatibleModel(self, api_key=self.resolved_api_key(), model_id=model_id)


URL_SECRET_CARRIERS = frozenset("@?#;")


def replica_urls(base_url: str) -> list[str]:
    """The servers a comma-separated ``base_url`` names, each without its trailing slash."""
    return [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]


def public_url(url: str) -> str:
    """A URL as it may be shown: scheme, host, port and path; no userinfo, query or fragment."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# A key this long is masked in any form an endpoint may echo it; a shorter one (vLLM's "EMPTY", a
# placeholder) only as written, so that replies saying "empty" stay intact.
FUZZY_SECRET_CHARS = 16
SECRET_PIECE_CHARS = 12  # a run this long of a key's letters and digits is treated as the key
MAX_REPLY_CHARS = 1_000_000  # far above any reply of max_tokens; a longer body is unusable


def _skeleton(text: str) -> tuple[str, list[int]]:
    """The letters and digits of ``text``, compatibility-folded (fullwidth → ASCII) and casefolded,
    with each one's position in ``text``: separators, zero-width marks and case do not hide a key."""
    letters, positions = [], []
    for position, char in enumerate(text):
        for folded in unicodedata.normalize("NFKC", char).casefold():
            if folded.isalnum():
                letters.append(folded)
                positions.append(position)
    return "".join(letters), positions


def _secret_pieces(secret: str) -> set[str]:
    """Every run of SECRET_PIECE_CHARS letters and digits of the key as written, reversed, in hex and
    in base64 at each byte offset."""
    raw = secret.encode()
    forms = [secret, secret[::-1], raw.hex()]
    forms += [base64.b64encode(b"\0" * offset + raw).decode()[4:-4] for offset in range(3)]
    pieces = set()
    for form in forms:
        letters = _skeleton(form)[0]
        pieces |= {letters[i : i + SECRET_PIECE_CHARS] for i in range(len(letters) - SECRET_PIECE_CHARS + 1)}
    return pieces


def redact_secret(text: str, secret: str | None) -> str:
    """``text`` with the secret masked (``***``): as written; for a real key also every stretch whose
    letters and digits hold 12 of the key's in a row in any case, width or spacing, reversed, in hex
    or base64; and the whole text where only its HTML-unescaped form holds the key. An endpoint
    set on hiding the key (it has it) can always encode it some other way; this stops the echoes."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    if len(secret) < FUZZY_SECRET_CHARS:
        return text
    pieces = _secret_pieces(secret)
    letters, positions = _skeleton(text)
    spans: list[list[int]] = []
    for i in range(len(letters) - SECRET_PIECE_CHARS + 1):
        if letters[i : i + SECRET_PIECE_CHARS] in pieces:
            start, end = positions[i], positions[i + SECRET_PIECE_CHARS - 1] + 1
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
    for start, end in reversed(spans):
        text = text[:start] + "***" + text[end:]
    unescaped = _skeleton(html.unescape(text))[0]
    if any(unescaped[i : i + SECRET_PIECE_CHARS] in pieces for i in range(len(unescaped) - SECRET_PIECE_CHARS + 1)):
        return "*** (the text held the API key in an encoded form)"
    return text


class UnusableReply(Exception):
    """A 200 answer that holds no completion text we can use."""


def completion_reply(body: Any) -> tuple[str, int, int, str | None]:
    """The text, prompt and completion token counts and finish reason of a chat-completion body
    (parsed JSON), or UnusableReply saying what is wrong with it. Read as plain JSON: validating it
    into the client's models costs more than the whole call does against a fast server."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        raise UnusableReply(f"the body is not a chat completion ({type(body).__name__})")
    if not choices:
        raise UnusableReply("the completion has no choices")
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise UnusableReply("the completion has no text content")
    if not text.strip():
        raise UnusableReply("the completion's content is empty")
    if len(text) > MAX_REPLY_CHARS:
        raise UnusableReply(f"the reply has {len(text):,} characters, more than any answer ({MAX_REPLY_CHARS:,})")
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}

    def tokens(name: str) -> int:  # usage is informational: odd values count as 0
        value = usage.get(name, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    finish = choice.get("finish_reason")
    return text, tokens("prompt_tokens"), tokens("completion_tokens"), finish if isinstance(finish, str) else None


class RequestFailed(Exception):
    """A request that may succeed when sent again: a connection error, a timeout, 408/409/429/5xx."""

    def __init__(self, message: str, kind: str, retry_after: float | None = None, should_retry: bool = True):
        super().__init__(message)
        self.message, self.kind, self.retry_after, self.should_retry = message, kind, retry_after, should_retry


class RequestRejected(Exception):
    """A request that cannot succeed as it is: a 4xx the server means (a bad key, an unknown model),
    or one the client cannot send at all (a proxy scheme it does not speak). Its text may quote the
    server, so it is masked before it is shown."""


class UndecodableBody(RequestFailed):
    """The body arrived but cannot be decoded (a gzip that is not gzip): retried like any failed
    request, then the call's unusable reply rather than a reason to fail over."""

    def __init__(self, cause: str):
        super().__init__(cause, "unusable_reply")


INITIAL_RETRY_DELAY_S, MAX_RETRY_DELAY_S, MAX_RETRY_AFTER_S = 0.5, 8.0, 60.0  # as the OpenAI clients wait
MAX_BODY_BYTES = 4 * MAX_REPLY_CHARS + 65_536  # a reply of MAX_REPLY_CHARS in any UTF-8, and its JSON
MAX_ERROR_BODY_BYTES = 4096  # what is read of an error answer: its message, not a hostile megabyte
MAX_DETAIL_CHARS = 200  # a 4xx's message as a row's error shows it


def retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def retry_backoff(retry: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s … up to 8 s, each up to a quarter shorter."""
    return min(INITIAL_RETRY_DELAY_S * 2**retry, MAX_RETRY_DELAY_S) * (1 - 0.25 * random.random())


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a 429/503 asks for (``retry-after-ms``, ``retry-after`` in seconds or as a date),
    when it is a sane one (over 0, at most a minute); else None and the backoff applies."""
    seconds: float | None = None
    try:
        if "retry-after-ms" in headers:
            seconds = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            value = headers["retry-after"]
            try:
                seconds = float(value)
            except ValueError:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if seconds is not None and 0 < seconds <= MAX_RETRY_AFTER_S else None


def error_detail(body: bytes) -> str:
    """What a 4xx says, on one line: the JSON error's message, else the body's text (cut to
    MAX_DETAIL_CHARS only after the key is masked, so no piece of a key survives at the cut)."""
    text = body.decode("utf-8", errors="replace")
    try:
        error = json.loads(body).get("error")
        text = str(error.get("message") or error) if isinstance(error, dict) else text
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())


def parsed_body(body: bytes) -> Any:
    """A 2xx body as JSON, or UnusableReply (not JSON, not UTF-8)."""
    try:
        return json.loads(body)
    except ValueError as exc:
        raise UnusableReply(f"invalid reply body ({type(exc).__name__})") from None


def tls_context() -> ssl.SSLContext:
    """Certificates as the OpenAI clients (httpx) trust them: certifi's bundle, unless
    SSL_CERT_FILE or SSL_CERT_DIR names the system's own (a corporate CA, say); a slim image
    without Debian's ca-certificates still reaches a hosted API."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"), capath=os.environ.get("SSL_CERT_DIR"))
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def account_headers() -> dict[str, str]:
    """The organization and project the OpenAI clients bill to (OPENAI_ORG_ID, OPENAI_PROJECT_ID),
    so the online and the batch backend charge the same account."""
    names = {"OpenAI-Organization": "OPENAI_ORG_ID", "OpenAI-Project": "OPENAI_PROJECT_ID"}
    return {header: os.environ[env].strip() for header, env in names.items() if os.environ.get(env, "").strip()}


async def bounded_body(response: Any) -> bytes:
    """The whole body, refused once it passes MAX_BODY_BYTES (a hostile endpoint's endless answer)."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65_536):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UnusableReply(f"the reply body is over {MAX_BODY_BYTES:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Replica:
    base_url: str
    failed_at: float = field(default=-1e9)
    proxy: str | None = field(init=False)

    def __post_init__(self) -> None:
        # the environment's proxy (HTTPS_PROXY, NO_PROXY), read once: aiohttp's trust_env reads it,
        # and ~/.netrc, in a thread for every request
        parts, proxies = urlsplit(self.base_url), urllib.request.getproxies()
        self.proxy = (
            None if not proxies or urllib.request.proxy_bypass(parts.hostname or "") else proxies.get(parts.scheme)
        )


class OpenAICompatibleModel:
    """``ChatModel`` over one or more OpenAI-compatible servers."""

    streams = True  # any number of calls at once, each reported (and stored) as it ends

    def __init__(self, settings: OpenAIChatSettings, api_key: str | None = None, model_id: str | None = None):
        urls = replica_urls(settings.base_url)
        if not urls:
            raise ValueError("the OpenAI-compatible teacher needs a base_url (e.g. http://127.0.0.1:8000/v1)")
        self.settings = settings
        self.model_id = model_id or settings.model_id(Path("."))
        self._api_key = api_key
        self._replicas = [_Replica(url) for url in urls]
        self._next_start = 0

    def _redact(self, text: str) -> str:
        return redact_secret(text, self._api_key)

    def request_body(self, messages: Messages, params: GenerationParams) -> dict[str, Any]:
        """The JSON body of one chat-completions request, exactly as it is sent."""
        request: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
        }
        if continues_reply(messages):
            # vLLM's server (and compatible ones) continue a final assistant turn when asked to.
            request |= {"add_generation_prompt": False, "continue_final_message": True}
        if params.json_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": params.json_schema.get("title", "srt_output"),
                    "schema": params.json_schema,
                    "strict": True,
                },
            }
        return request

    def _replica_order(self) -> list[int]:
        """Round-robin start; replicas that failed recently go last."""
        start = self._next_start
        self._next_start += 1
        order = [(start + k) % len(self._replicas) for k in range(len(self._replicas))]
        now = time.monotonic()
        return sorted(order, key=lambda i: now - self._replicas[i].failed_at < REPLICA_COOLDOWN_S)

    async def _call(self, session: Any, messages: Messages, params: GenerationParams) -> Generation:
        """One call: a replica's failed requests are retried there; a replica that still fails hands
        over to the next; an unusable reply is asked again, up to ``max_retries`` times."""
        payload = json.dumps(self.request_body(messages, params), ensure_ascii=False).encode()
        order = self._replica_order()
        failed_replicas = unusable = position = 0
        while True:
            index = order[position % len(order)]
            position += 1
            try:
                body = await self._with_retries(session, self._replicas[index], payload)
                text, prompt_tokens, completion_tokens, finish = completion_reply(parsed_body(body))
                return Generation(  # a reply that quotes the key must not store it
                    self._redact(text),
                    prompt_tokens,
                    completion_tokens,
                    attempts=_requests_of_call.get()[0],
                    finish_reason=finish,
                )
            except RequestRejected as exc:  # the request itself is wrong: asking again cannot help
                return self._failure(self._redact(str(exc))[:MAX_DETAIL_CHARS], "client_error")
            except UndecodableBody as exc:
                return self._failure(f"the reply body cannot be decoded ({exc})", "unusable_reply")
            except RequestFailed as exc:
                failure = (exc.message, exc.kind)
            except UnusableReply as exc:
                reason = str(exc)
                unusable += 1
                if unusable > self.settings.max_retries:
                    return self._failure(self._redact(reason), "unusable_reply")
                log.info("teacher reply unusable (%s); asking again", reason)
                continue
            # this replica's retries are spent: fail over to the next, if any is left
            self._replicas[index].failed_at = time.monotonic()
            failed_replicas += 1
            if failed_replicas >= len(order):
                return self._failure(*failure)
            url = public_url(self._replicas[index].base_url)
            log.info("teacher call failed on %s (%s); trying the next replica", url, failure[0])

    async def _with_retries(self, session: Any, replica: _Replica, payload: bytes) -> bytes:
        """The body of a 2xx answer from one replica, retrying what the OpenAI clients retry
        (connection errors, timeouts, 408/409/429/5xx) with their backoff and ``Retry-After``."""
        for retry in range(self.settings.max_retries):
            try:
                return await self._send(session, replica, payload)
            except RequestFailed as exc:
                if not exc.should_retry:
                    raise
                wait = exc.retry_after or retry_backoff(retry)
                log.debug("teacher request failed (%s); retrying in %.2fs", exc, wait)
                await asyncio.sleep(wait)
        return await self._send(session, replica, payload)  # the last try: its failure is the call's

    async def _send(self, session: Any, replica: _Replica, payload: bytes) -> bytes:
        """One request: the body of a 2xx answer, or the typed failure it ended in."""
        import aiohttp

        _requests_of_call.get()[0] += 1
        try:
            url = f"{replica.base_url}/chat/completions"
            async with session.post(url, data=payload, proxy=replica.proxy) as response:
                status, headers = response.status, response.headers
                # an error answer is read only as far as its message: never a hostile megabyte
                body = (
                    await bounded_body(response) if status < 300 else await response.content.read(MAX_ERROR_BODY_BYTES)
                )
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
            raise RequestFailed(f"request timed out after {self.settings.timeout_s:g}s", "timeout") from exc
        except aiohttp.ClientPayloadError as exc:
            if isinstance(exc.__cause__, aiohttp.http_exceptions.ContentEncodingError):
                raise UndecodableBody(type(exc).__name__) from exc
            raise RequestFailed(f"connection failed: {type(exc).__name__}", "connection_error") from exc
        except aiohttp.ClientError as exc:
            raise RequestFailed(f"connection failed: {type(exc).__name__}", "connection_error") from exc
        except ValueError as exc:  # aiohttp refusing what it was given (an unknown proxy scheme, say)
            raise RequestRejected(f"the request could not be sent ({type(exc).__name__})") from exc
        if status < 300:
            return body
        should_retry = headers.get("x-should-retry", "").lower()  # the server's word overrides the status
        if not retryable_status(status) and should_retry != "true":
            raise RequestRejected(f"HTTP {status}: {error_detail(body)}")
        kind = "rate_limited" if status == 429 else "server_error"
        raise RequestFailed(f"HTTP {status}", kind, retry_after(headers), should_retry != "false")

    @staticmethod
    def _failure(error: str, kind: str) -> Generation:
        return Generation(None, error=error, error_kind=kind, attempts=_requests_of_call.get()[0])

    def _session(self) -> Any:
        """One connection pool for every replica, sized to the calls in flight."""
        import aiohttp

        settings = self.settings
        headers = {"Content-Type": "application/json", "User-Agent": "srt-assets", **account_headers()}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, settings.concurrency), ssl=tls_context()),
            # like the OpenAI clients' timeout: per connect and per read, so a server that trickles
            # bytes is stopped by the call's deadline, not here
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout_s, sock_read=settings.timeout_s),
            headers=headers,
        )

    async def _generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None
    ) -> list[Generation]:
        settings = self.settings
        slots = asyncio.Semaphore(max(1, settings.concurrency))
        results: list[Generation | None] = [None] * len(conversations)

        async def one(i: int, messages: Messages) -> None:
            async with slots:
                started = time.monotonic()
                requests = [0]  # counted by _send, retries included
                _requests_of_call.set(requests)
                try:
                    generation = await asyncio.wait_for(self._call(session, messages, params), settings.deadline_s)
                except TimeoutError:
                    generation = Generation(
                        None,
                        error=f"no usable reply within the {settings.deadline_s:g}s deadline "
                        f"({time.monotonic() - started:.1f}s)",
                        error_kind="deadline",
                        attempts=requests[0],
                    )
            results[i] = generation
            if on_done:
                on_done(i, generation)

        async with self._session() as session:
            await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations)))
        return results  # type: ignore[return-value]

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        return asyncio.run(self._generate(conversations, params, on_done))

"""A hosted teacher through the OpenAI Batch API (``/v1/files`` and ``/v1/batches``): the requests the
online backend sends, written as JSONL, run by the provider within its completion window at a
discount (half the price at OpenAI), and collected when the batch ends.

A batch runs for minutes to hours, longer than a step may live, so each step of it is written down
as it happens, in a ledger in the call-cache database (namespace ``teacher_batches``):

    batch:<id>        {server, file_id, batch_id, state, requests, uploaded_at, collected}
    call:<custom_id>  the id of the batch its latest request went into

where a batch's id is a hash of its input file's sorted custom_ids, the calls' cache keys. A rerun
(or another process, after a kill) asking for the same calls finds them there and waits on the
batch already running instead of paying for it again: with a batch id it polls it; with only a file
id it looks for the batch made from that file before making one (and after any create that failed:
the provider may have made it all the same), or uploads the calls again if the file is gone. An
ended batch (completed, expired, failed, cancelled) is collected once: the calls asked are
delivered, its other usable replies (calls a run asked for before) go straight into the call cache,
and its calls without a usable reply are ``call_failed`` rows, asked again in a new batch.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, field_validator

from srt_assets.core.cache import content_key, open_cache
from srt_assets.core.generation import Generation, GenerationParams, Messages, OnDone, call_key
from srt_assets.models.compute import ComputeSettings
from srt_assets.models.openai_compatible import (
    OpenAIChatSettings,
    OpenAICompatibleModel,
    UnusableReply,
    completion_reply,
    public_url,
    replica_urls,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
CHAT_URL = "/v1/chat/completions"  # the endpoint every request line names, whatever the base_url
TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})
MAX_ERROR_CHARS = 300  # an error text kept in a row: enough to read, bounded whatever the server says
# what a call of an ended batch gets when neither the output nor the error file answers it
UNANSWERED = {
    "completed": ("the batch completed without a reply to this request", "batch_missing_reply"),
    "expired": ("the batch expired before this request ran", "batch_expired"),
    "cancelled": ("the batch was cancelled before this request ran", "batch_cancelled"),
}


class OpenAIBatchSettings(OpenAIChatSettings):
    """The OpenAI-compatible teacher through the provider's Batch API: the same requests, model
    identity (so both backends share cached replies) and key handling as ``openai``, sent as batch
    input files. ``concurrency`` and ``deadline_s`` do not apply: the provider runs the batch."""

    backend = "openai-batch"
    streams = True  # takes every call of a block at once
    submits_ahead = True

    batch_discount: float = Field(
        0.5, ge=0, le=1, description="the provider's discount on batch tokens (OpenAI: half the price), for the cost"
    )
    poll_interval_s: float = Field(30.0, gt=0, description="seconds between looks at a running batch")
    max_wait_s: float = Field(
        26 * 3600.0,
        gt=0,
        description="longest one wait on a block's batches (each block, and each round of its parse retries, "
        "may wait this long: it bounds one wait, not the run); then the step fails saying they still run, and a "
        "rerun picks them up (nothing is sent again)",
    )
    completion_window: str = Field("24h", description="the time the provider has to run a batch (OpenAI: 24h)")
    max_requests_per_file: int = Field(50_000, gt=0, description="requests per input file; more go in several")
    max_file_bytes: int = Field(200_000_000, gt=0, description="bytes per input file (OpenAI: 200 MB)")

    @field_validator("base_url")
    @classmethod
    def _one_server(cls, value: str) -> str:
        """A batch lives on the server it was sent to: there is nothing to fail over to."""
        if len(replica_urls(value)) > 1:
            raise ValueError(
                "the openai-batch teacher takes one base_url: a batch lives on the server it was sent to "
                "(several replicas are for the online openai backend)"
            )
        return value

    def estimated_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return super().estimated_cost(prompt_tokens, completion_tokens) * (1 - self.batch_discount)

    def build(
        self, compute: ComputeSettings, models_dir: Path, model_id: str, *, cache_location: str | Path | None = None
    ) -> OpenAIBatchModel:
        if cache_location is None:
            raise ValueError("the openai-batch teacher keeps its ledger in the call cache: pass cache_location")
        return OpenAIBatchModel(self, cache_location, api_key=self.resolved_api_key(), model_id=model_id)


class BatchAPIError(RuntimeError):
    """A Batch API request that failed, its text redacted; ``transient``: worth asking again later."""

    def __init__(self, message: str, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


class FileGone(BatchAPIError):
    """A create refused because the provider no longer has its input file (a 404, or a 400 naming it)."""


class BatchesStillRunning(RuntimeError):
    """One wait on a block's batches took ``max_wait_s``; they go on at the provider, a rerun collects them."""


@dataclass
class _Batch:
    """One input file of calls at the provider, as the ledger knows it, and the calls asked of it."""

    key: str
    entry: dict[str, Any]
    calls: list[str] = field(default_factory=list)  # custom_ids this run wants from it
    maybe_made: bool = True  # a batch may exist for its file (made by a process that died before noting its id)


class OpenAIBatchModel(OpenAICompatibleModel):
    """``ChatModel`` over one server's Batch API, its ledger in the call-cache database."""

    streams = True
    submits_ahead = True

    def __init__(
        self,
        settings: OpenAIBatchSettings,
        cache_location: str | Path,
        api_key: str | None = None,
        model_id: str | None = None,
    ):
        super().__init__(settings, api_key=api_key, model_id=model_id)
        self.settings: OpenAIBatchSettings = settings
        self.server = public_url(replica_urls(settings.base_url)[0])
        self._ledger = open_cache(cache_location, "teacher_batches")
        self._cache_location = cache_location
        self._calls: Any = None  # the call cache, opened when a batch holds replies no one asked for
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=replica_urls(self.settings.base_url)[0],
                api_key=self._api_key or "unused",  # servers without auth ignore it
                timeout=self.settings.timeout_s,
                max_retries=self.settings.max_retries,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._calls is not None:
            self._calls.close()
        self._ledger.close()

    def submit(self, conversations: Sequence[Messages], params: GenerationParams) -> None:
        """Put the calls into batches at the provider (or find them there) without waiting."""
        self._batches_for({call_key(self.model_id, m, params): m for m in conversations}, params)

    def generate(
        self, conversations: Sequence[Messages], params: GenerationParams, on_done: OnDone | None = None
    ) -> list[Generation]:
        """Every call's reply or failure, each reported as its batch ends."""
        keys = [call_key(self.model_id, m, params) for m in conversations]
        positions: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
        results: list[Generation | None] = [None] * len(keys)

        def deliver(key: str, generation: Generation) -> None:
            for n, i in enumerate(positions[key]):
                results[i] = generation if n == 0 else replace(generation, attempts=0)  # one request served all
                if on_done:
                    on_done(i, results[i])  # type: ignore[arg-type]

        self._wait(self._batches_for(dict(zip(keys, conversations, strict=True)), params), deliver)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- submitting

    def _batches_for(self, calls: dict[str, Messages], params: GenerationParams) -> list[_Batch]:
        """The batches that hold ``calls``: those the ledger has running (or ended and not yet
        collected) for them, and new ones for the rest, each created at the provider."""
        known = self._ledger.get_many(f"call:{key}" for key in calls)
        entries = self._ledger.get_many({f"batch:{ident}" for ident in known.values()})
        batches: dict[str, _Batch] = {}
        fresh: dict[str, Messages] = {}
        for key, messages in calls.items():
            ident = known.get(f"call:{key}")
            entry = entries.get(f"batch:{ident}")
            if entry is None or entry.get("collected") or entry.get("server") != self.server:
                fresh[key] = messages
            else:
                batches.setdefault(ident, _Batch(ident, entry)).calls.append(key)
        for batch in list(batches.values()):
            if not batch.entry.get("batch_id") and not self._created_soon(batch):
                del batches[batch.key]  # its file is gone: its calls go in a new one
                fresh.update((key, calls[key]) for key in batch.calls)
        for keys, payload in self._input_files(fresh, params):
            batch = self._uploaded(keys, payload)
            while not batch.entry.get("batch_id") and not self._created_soon(batch):
                batch = self._uploaded(keys, payload)  # chained to a new id past the lost entry
            batches[batch.key] = batch
        return list(batches.values())

    def _created_soon(self, batch: _Batch) -> bool:
        """Create the batch now, or leave a refused create (a full queue, say) to the polls. False
        when the ledger's file is gone at the provider (deleted, expired): the entry is marked lost,
        else every rerun would fail on it."""
        from_ledger = batch.maybe_made  # a file uploaded just now is not uploaded again: no loop
        try:
            self._started(batch)
        except FileGone as exc:
            if not from_ledger:
                raise
            log.warning("%s; its calls are uploaded again", exc)
            batch.entry.update(state="lost", collected=True)
            self._save(batch.key, batch.entry)
            return False
        except BatchAPIError as exc:
            if not exc.transient:
                raise
            log.info("%s; the batch is created later", exc)
        return True

    def _input_files(self, calls: dict[str, Messages], params: GenerationParams) -> Iterator[tuple[list[str], bytes]]:
        """The calls as JSONL input files within the provider's limits, requests and bytes per file."""
        limit, max_bytes = self.settings.max_requests_per_file, self.settings.max_file_bytes
        keys: list[str] = []
        lines: list[bytes] = []
        size = 0
        for key, messages in calls.items():
            request = {"custom_id": key, "method": "POST", "url": CHAT_URL, "body": self.request_body(messages, params)}
            line = json.dumps(request, ensure_ascii=False).encode() + b"\n"
            if keys and (len(keys) >= limit or size + len(line) > max_bytes):
                yield keys, b"".join(lines)
                keys, lines, size = [], [], 0
            keys.append(key)
            lines.append(line)
            size += len(line)
        if keys:
            yield keys, b"".join(lines)

    def _uploaded(self, keys: list[str], payload: bytes) -> _Batch:
        """The ledger's batch of exactly these calls, uploading its input file unless that was done
        (and not yet collected): a rerun after a kill finds the file instead of sending it again."""
        ident = content_key("openai-batch", self.server, sorted(keys))
        entry = self._ledger.get(f"batch:{ident}")
        while entry is not None and entry.get("collected"):  # these calls ran once already: a new batch
            ident = content_key(ident, entry["file_id"])
            entry = self._ledger.get(f"batch:{ident}")
        uploaded = entry is None
        if entry is None:
            upload = ("srt-teacher-batch.jsonl", payload, "application/jsonl")
            file = self._api(
                "uploading a batch input file", lambda: self.client.files.create(file=upload, purpose="batch")
            )
            entry = {"server": self.server, "file_id": file.id, "batch_id": None, "state": "uploaded",
                     "requests": len(keys), "uploaded_at": time.time(), "collected": False}  # fmt: skip
            self._save(ident, entry)
            log.info("uploaded batch input %s: %d requests, %d bytes", file.id, len(keys), len(payload))
        self._ledger.put_many({f"call:{key}": ident for key in keys})
        return _Batch(ident, entry, list(keys), maybe_made=not uploaded)

    def _started(self, batch: _Batch) -> None:
        """Create the batch of an uploaded file, unless a process that died before writing its id
        down had created it already."""
        entry = batch.entry
        remote = self._made_from(entry["file_id"], entry.get("uploaded_at", 0.0)) if batch.maybe_made else None
        if remote is None:
            try:  # no client retries: a create answered too late is found by _made_from, not made twice
                remote = self._api(
                    "creating a batch",
                    lambda: self.client.with_options(max_retries=0).batches.create(
                        input_file_id=entry["file_id"],
                        endpoint=CHAT_URL,
                        completion_window=self.settings.completion_window,
                        metadata={"srt_batch": batch.key},
                    ),
                )
            except BatchAPIError as exc:
                batch.maybe_made = True  # the provider may have made it all the same: look first next time
                if exc.status == 404 or (exc.status == 400 and entry["file_id"] in str(exc)):
                    raise FileGone(str(exc), exc.status) from None
                raise
            log.info("created batch %s from %s (%d requests)", remote.id, entry["file_id"], entry["requests"])
        entry.update(batch_id=remote.id, state=remote.status)
        self._save(batch.key, entry)

    def _made_from(self, file_id: str, uploaded_at: float) -> Any | None:
        """The batch whose input is ``file_id``, if any: the list is newest first, so it stops at
        batches made well before the upload (an hour of clock skew allowed)."""
        page = self._api("listing batches", lambda: self.client.batches.list(limit=100))
        while True:
            for remote in page.data:
                if remote.input_file_id == file_id and not _refused_for_room(remote):
                    return remote
                if remote.created_at < uploaded_at - 3600:
                    return None
            if not page.has_next_page():
                return None
            page = self._api("listing batches", page.get_next_page)

    # ---------------------------------------------------------------- waiting and collecting

    def _wait(self, batches: list[_Batch], deliver: Callable[[str, Generation], None]) -> None:
        """Poll until every batch has ended and been collected, or fail after ``max_wait_s``."""
        interval = self.settings.poll_interval_s
        deadline = time.monotonic() + self.settings.max_wait_s
        running = list(batches)
        while running:
            for batch in list(running):
                try:
                    if self._advanced(batch, deliver):
                        running.remove(batch)
                except BatchAPIError as exc:
                    if exc.status == 404 or isinstance(exc, FileGone):  # gone: its calls go in a new batch
                        self._collect_lost(batch, str(exc), deliver)
                        running.remove(batch)
                    elif not exc.transient:
                        raise
                    else:
                        log.info("%s; looking again in %gs", exc, interval)
            if running and time.monotonic() + interval > deadline:
                ids = ", ".join(b.entry.get("batch_id") or b.entry["file_id"] for b in running[:5])
                ids += ", ..." if len(running) > 5 else ""
                raise BatchesStillRunning(
                    f"{len(running)} teacher batch(es) still running at {self.server} after waiting "
                    f"{self.settings.max_wait_s:g}s ({ids}): rerun the step to collect them (nothing is sent "
                    "again), or raise max_wait_s"
                )
            if running:
                time.sleep(interval)

    def _advanced(self, batch: _Batch, deliver: Callable[[str, Generation], None]) -> bool:
        """One look at a batch: True once it has ended and been collected. A batch the provider had
        no room for (its create refused, or failed for a full queue of enqueued tokens) is created
        again from the same file, so a stage that queued many blocks ahead still gets them all run."""
        if not batch.entry.get("batch_id"):
            self._started(batch)
            return False
        remote = self._poll(batch)
        if _refused_for_room(remote):
            log.info("batch %s refused for a full queue at %s; creating it again", remote.id, self.server)
            self._started(batch)  # maybe_made stays: a kill after an earlier re-create left it unnoted
            return False
        if remote.status not in TERMINAL:
            return False
        self._collect(batch, remote, deliver)
        return True

    def _poll(self, batch: _Batch) -> Any:
        remote = self._api("checking a batch", lambda: self.client.batches.retrieve(batch.entry["batch_id"]))
        if remote.status != batch.entry.get("state"):
            batch.entry["state"] = remote.status
            self._save(batch.key, batch.entry)
        return remote

    def _collect(self, batch: _Batch, remote: Any, deliver: Callable[[str, Generation], None]) -> None:
        """Deliver every asked call of an ended batch and cache its other usable replies (paid for,
        asked by an earlier run), then mark it collected: a kill in between leaves it to be
        collected again, never lost."""
        found: dict[str, Generation] = {}
        if remote.status == "failed":
            errors = (remote.errors.data if remote.errors else None) or []
            reasons = "; ".join(f"{e.code or 'error'}: {e.message or ''}" for e in errors) or "no reason given"
            unanswered = self._failed(f"the provider refused the batch ({reasons})", "batch_failed")
        else:
            for file_id in (remote.output_file_id, remote.error_file_id):
                if file_id:
                    found.update(self._api("downloading batch results", lambda f=file_id: self._results(f)))
            unanswered = self._failed(*UNANSWERED.get(remote.status, UNANSWERED["cancelled"]))
        results, asked = len(found), len(batch.calls)
        for key in batch.calls:
            deliver(key, found.pop(key, None) or unanswered)
        self._keep(found)
        batch.entry.update(state=remote.status, collected=True)
        self._save(batch.key, batch.entry)
        log.info("collected batch %s (%s): %d results, %d calls asked", remote.id, remote.status, results, asked)

    def _keep(self, replies: dict[str, Generation]) -> None:
        """The usable replies no call of this run asked for, stored as ``CachedGenerator`` stores
        them, so the run that wants them finds them in the cache instead of buying them again."""
        usable = {key: asdict(generation) for key, generation in replies.items() if generation.usable}
        if usable:
            if self._calls is None:
                self._calls = open_cache(self._cache_location, "teacher_calls")
            self._calls.put_many(usable)

    def _collect_lost(self, batch: _Batch, reason: str, deliver: Callable[[str, Generation], None]) -> None:
        for key in batch.calls:
            deliver(key, self._failed(reason, "batch_missing"))
        batch.entry.update(collected=True)
        self._save(batch.key, batch.entry)

    def _results(self, file_id: str) -> dict[str, Generation]:
        """The results a batch output or error file holds, read line by line."""
        found: dict[str, Generation] = {}
        with self.client.files.with_streaming_response.content(file_id) as response:
            for line in response.iter_lines():
                key, generation = self._line_result(line)
                if key is not None and generation is not None:
                    found[key] = generation
        return found

    def _line_result(self, line: str) -> tuple[str | None, Generation | None]:
        """One result line: a 200 body is a reply (or unusable), anything else that call's failure."""
        try:
            record = json.loads(line)
        except ValueError:
            return None, None
        key = record.get("custom_id") if isinstance(record, dict) else None
        if not isinstance(key, str):  # nothing to tell whose result it is
            return None, None
        error = record.get("error")
        response = record.get("response") if isinstance(record.get("response"), dict) else {}
        if isinstance(error, dict):
            code = str(error.get("code") or "error")
            kind = "batch_expired" if code == "batch_expired" else "batch_request_failed"
            return key, self._failed(f"{code}: {error.get('message') or ''}", kind)
        body = response.get("body")
        if response.get("status_code") != 200:
            return key, self._failed(f"HTTP {response.get('status_code')}: {_error_text(body)}", "batch_request_failed")
        try:
            text, prompt_tokens, completion_tokens, finish = completion_reply(body)
        except UnusableReply as exc:
            return key, self._failed(str(exc), "unusable_reply")
        return key, Generation(self._redact(text), prompt_tokens, completion_tokens, finish_reason=finish)

    # ---------------------------------------------------------------- plumbing

    def _failed(self, error: str, kind: str) -> Generation:
        """A call's failure, its text redacted and bounded (a server may echo anything, the key too)."""
        return Generation(None, error=self._redact(" ".join(error.split()))[:MAX_ERROR_CHARS], error_kind=kind)

    def _save(self, ident: str, entry: dict[str, Any]) -> None:
        self._ledger.put_many({f"batch:{ident}": entry})

    def _api(self, what: str, call: Callable[[], T]) -> T:
        """One Batch API request. A failure becomes BatchAPIError, its text redacted and nothing
        chained to it (a chained exception would carry the raw text into the event log)."""
        import openai

        try:
            return call()
        except openai.APIStatusError as exc:
            status: int | None = exc.status_code
            detail = f"HTTP {status}: {exc.message}"
            transient = status in (408, 409, 429) or status >= 500
        except (openai.APIConnectionError, *_http_errors()) as exc:  # timeouts, bodies cut mid-stream
            status, detail, transient = None, f"connection failed ({type(exc).__name__})", True
        raise BatchAPIError(
            f"{what} at {self.server}: {self._redact(' '.join(detail.split()))[:MAX_ERROR_CHARS]}", status, transient
        )


def _http_errors() -> tuple[type[Exception], ...]:
    """The errors of the openai client's HTTP library (httpx2 from openai 3, httpx before), which a
    streamed body read (``iter_lines``) raises unwrapped."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def _refused_for_room(remote: Any) -> bool:
    """A batch that failed only because the provider's queue of enqueued tokens was full: its file
    is sound, and the same batch is accepted once earlier ones have finished."""
    errors = (remote.errors.data if remote.status == "failed" and remote.errors else None) or []
    return bool(errors) and all(error.code == "token_limit_exceeded" for error in errors)


def _error_text(body: Any) -> str:
    """The message of an error body (``{"error": {"message": ...}}``), or the body itself."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or body or "")

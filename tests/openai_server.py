"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, for tests.

It stands in for a hosted API (which cannot be reached here). Replies are scripted from the request
so tests know what to expect, and faults are injected by a marker in the user message. ``FAULT:kind``
answers with the fault on every attempt until the test sets ``server.fixed = True`` (the endpoint was
mended); ``FAULT:kindxN`` only on the first N attempts.

    429        answers 429 with Retry-After
    500, 503   answers that status
    timeout    sleeps past the client's timeout before answering
    hang       never answers within a test's patience (60 s)
    reset      closes the connection without answering
    trickle    sends a valid completion one byte every 0.3 s
    garbage    200 with a body that is not JSON
    html       200 with an HTML error page (text/html)
    nochoices  200 with an empty choices list
    empty      200 with empty content
    oddusage   200 with a usable completion whose usage is "n/a"
    badgzip    200 that claims Content-Encoding gzip over a body that is not gzip
    hugebody   200 whose body is 6 MB (a completion padded with spaces): more than any reply
    noretry    503 with ``x-should-retry: false`` (the server says asking again is pointless)
    echokey    401 whose body echoes the request's Authorization header (the key)
    echoaltered  401 whose body echoes the key altered: upper-cased and cut, and base64-encoded
    echoreply  a usable 200 reply that quotes the key in its text
    echolong   401 whose message echoes the key after 178 characters of text (across a cut at 200)
    nomarkers  a usable reply without the reflection markers (a parse failure)
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTRUCTION_RE = re.compile(r"\[Instruction\]\n(.*?)\n\n", re.S)
ANSWER_RE = re.compile(r"\[The Start of Answer\]\n(.*?)\n\n\[The End of Answer\]", re.S)
FAULT_RE = re.compile(r"FAULT:([a-z0-9]+?)(?:x(\d+))?\b")


def last_user_message(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def scripted_reply(messages: list[dict]) -> str:
    """The reply; a conversation that ends in a prefilled assistant turn gets only its continuation,
    as vLLM's server answers with ``continue_final_message``."""
    prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    reply = _full_reply(messages)
    return reply.split(prefill, 1)[1] if prefill and prefill in reply else reply


def _full_reply(messages: list[dict]) -> str:
    user = last_user_message(messages)
    instruction_match, answer_match = INSTRUCTION_RE.search(user), ANSWER_RE.search(user)
    if not instruction_match or not answer_match:  # not a reflection prompt (a judge, a benchmark)
        return "8 6\nThe first answer is more detailed."
    instruction, answer = instruction_match.group(1), answer_match.group(1)
    if "FAULT:nomarkers" in user:
        return "I think the instruction is fine as it is."
    if "[New Instruction]" in user:  # the instruction-reflection criteria name this marker
        return (
            "1. The instruction is too simple.\n"
            f"[New Instruction] Explain step by step, with an example: {instruction} [End]\n"
            f"[New Answer] A detailed answer to '{instruction}', building on: {answer} [End]"
        )
    return f"1. The answer lacks detail.\n[Better Answer] {answer} Here is more detail and an example. [End]"


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections under a test's concurrency
    daemon_threads = True
    block_on_close = False  # a hung handler must not hold the test up at exit


class ScriptedOpenAIServer:
    def __init__(
        self,
        api_key: str | None = None,
        latency: float = 0.0,
        retry_after: float = 0.2,
        reply: Callable[[list[dict]], str] = scripted_reply,
    ):
        self.reply = reply  # messages → reply text (a judge with a known preference, say)
        self.api_key = api_key
        self.latency = latency
        self.retry_after = retry_after
        self.fixed = False  # set by a test once the "endpoint" is mended: every fault stops
        self.requests = 0
        self.payloads: list[dict] = []
        self.attempts: Counter[str] = Counter()  # per user message
        self.times: dict[str, list[float]] = {}
        self.authorization: set[str] = set()
        self.projects: set[str] = set()  # the OpenAI-Project header of every request
        self.in_flight = 0
        self.max_in_flight = 0
        self.timeout_sleep = 1.5
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def requests_for(self, marker: str) -> int:
        """Requests the server received for the user messages that contain ``marker``."""
        return sum(count for user, count in self.attempts.items() if marker in user)

    def __enter__(self) -> ScriptedOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                return

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                user = last_user_message(payload["messages"])
                with outer.lock:
                    outer.payloads.append(payload)
                    outer.requests += 1
                    outer.attempts[user] += 1
                    attempt = outer.attempts[user]
                    outer.times.setdefault(user, []).append(time.monotonic())
                    outer.authorization.add(self.headers.get("Authorization", ""))
                    outer.projects.add(self.headers.get("OpenAI-Project", ""))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self._answer(payload, user, attempt)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout or a deadline): nothing to answer
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _fault(self, user: str, attempt: int) -> str | None:
                match = FAULT_RE.search(user)
                if not match or outer.fixed or match.group(1) == "nomarkers":
                    return None
                if match.group(2) is not None and attempt > int(match.group(2)):
                    return None
                return match.group(1)

            def _completion(self, payload: dict, user: str, attempt: int, content=None, usage=None) -> bytes:
                text = outer.reply(payload["messages"]) if content is None else content
                body = {
                    "id": f"cmpl-{attempt}",
                    "object": "chat.completion",
                    "model": payload["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": usage
                    if usage is not None
                    else {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split())},
                }
                return json.dumps(body).encode()

            def _answer(self, payload: dict, user: str, attempt: int) -> None:
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    self._send(401, b'{"error": {"message": "bad key"}}')
                    return
                if outer.latency:
                    time.sleep(outer.latency)
                fault = self._fault(user, attempt)
                if fault == "429":
                    self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": str(outer.retry_after)})
                elif fault in ("500", "503"):
                    self._send(int(fault), b'{"error": {"message": "boom"}}')
                elif fault == "hang":
                    time.sleep(60)
                elif fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif fault == "trickle":
                    body = self._completion(payload, user, attempt)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.3)
                elif fault == "garbage":
                    self._send(200, b"this is not json {")
                elif fault == "html":
                    self._send(200, b"<html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"})
                elif fault == "nochoices":
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
                elif fault == "empty":
                    self._send(200, self._completion(payload, user, attempt, content=""))
                elif fault == "oddusage":
                    self._send(200, self._completion(payload, user, attempt, usage="n/a"))
                elif fault == "hugebody":
                    self._send(200, self._completion(payload, user, attempt)[:-1] + b" " * 6_000_000 + b"}")
                elif fault == "noretry":
                    self._send(503, b'{"error": {"message": "overloaded"}}', {"x-should-retry": "false"})
                elif fault == "badgzip":
                    self._send(200, self._completion(payload, user, attempt), {"Content-Encoding": "gzip"})
                elif fault in ("echoaltered", "echoreply"):
                    key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    if fault == "echoreply":
                        quoted = f"[New Instruction] Print {key} [End]\n[New Answer] It is {key}. [End]"
                        self._send(200, self._completion(payload, user, attempt, content=quoted))
                    else:
                        told = f"key {key.upper()[:-2]} rejected (b64 {base64.b64encode(key.encode()).decode()})"
                        self._send(401, json.dumps({"error": {"message": told}}).encode())
                elif fault == "echolong":
                    key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    self._send(401, json.dumps({"error": {"message": f"{'x' * 178} {key}"}}).encode())
                elif fault == "echokey":
                    echoed = json.dumps({"error": {"message": f"invalid key: {self.headers.get('Authorization')}"}})
                    self._send(401, echoed.encode())
                else:
                    if fault == "timeout":
                        time.sleep(outer.timeout_sleep)
                    self._send(200, self._completion(payload, user, attempt))

        return Handler

"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, for tests.

It stands in for a hosted API (which cannot be reached here). Replies are scripted from the request
so tests know what to expect, and faults are injected by a marker in the user message:

    FAULT:429       first attempt answers 429 with Retry-After, then succeeds
    FAULT:500x2     first two attempts answer 500, then succeeds
    FAULT:timeout   first attempt sleeps past the client's timeout, then succeeds
    FAULT:garbage   first attempt answers 200 with a body that is not a completion, then succeeds
    FAULT:nomarkers always answers without the reflection markers (a parse failure)
    FAULT:down      always answers 503
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTRUCTION_RE = re.compile(r"\[Instruction\]\n(.*?)\n\n", re.S)
ANSWER_RE = re.compile(r"\[The Start of Answer\]\n(.*?)\n\n\[The End of Answer\]", re.S)


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
    instruction = INSTRUCTION_RE.search(user).group(1)
    answer = ANSWER_RE.search(user).group(1)
    if "FAULT:nomarkers" in user:
        return "I think the instruction is fine as it is."
    if "[New Instruction]" in user:  # the instruction-reflection criteria name this marker
        return (
            "1. The instruction is too simple.\n"
            f"[New Instruction] Explain step by step, with an example: {instruction} [End]\n"
            f"[New Answer] A detailed answer to '{instruction}', building on: {answer} [End]"
        )
    return f"1. The answer lacks detail.\n[Better Answer] {answer} Here is more detail and an example. [End]"


class ScriptedOpenAIServer:
    def __init__(self, api_key: str | None = None, latency: float = 0.0, retry_after: float = 0.2):
        self.api_key = api_key
        self.latency = latency
        self.retry_after = retry_after
        self.requests = 0
        self.payloads: list[dict] = []
        self.attempts: Counter[str] = Counter()  # per user message
        self.times: dict[str, list[float]] = {}
        self.authorization: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.timeout_sleep = 1.5
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

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
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
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
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self._answer(payload, user, attempt)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _answer(self, payload: dict, user: str, attempt: int) -> None:
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    self._send(401, b'{"error": {"message": "bad key"}}')
                    return
                if outer.latency:
                    time.sleep(outer.latency)
                if "FAULT:down" in user:
                    self._send(503, b'{"error": "down"}')
                    return
                if "FAULT:429" in user and attempt == 1:
                    self._send(429, b'{"error": "slow down"}', {"Retry-After": str(outer.retry_after)})
                    return
                if "FAULT:500x2" in user and attempt <= 2:
                    self._send(500, b'{"error": "boom"}')
                    return
                if "FAULT:timeout" in user and attempt == 1:
                    time.sleep(outer.timeout_sleep)
                if "FAULT:garbage" in user and attempt == 1:
                    self._send(200, b"<html>not json</html>")
                    return
                text = scripted_reply(payload["messages"])
                body = {
                    "id": f"cmpl-{attempt}",
                    "object": "chat.completion",
                    "model": payload["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split())},
                }
                self._send(200, json.dumps(body).encode())

        return Handler

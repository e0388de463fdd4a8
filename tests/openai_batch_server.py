"""A real HTTP server on 127.0.0.1 that speaks the OpenAI Batch API, for tests: ``POST /v1/files``
(multipart, purpose=batch), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches/{id}`` and ``GET /v1/batches`` (newest first, ``after``/``limit`` pages).

A batch ends on its ``polls_to_finish``-th poll (``None``: it runs until the test says otherwise);
its replies are ``openai_server.scripted_reply``'s. How it ends is the server's ``mode`` when the
batch was created:

    complete  every line answered; a line whose user message holds ``BATCH:400`` or ``BATCH:500`` goes
              to the error file with that status, until the test sets ``server.fixed = True``
    expired   the first half of the lines answered, the rest in the error file as ``batch_expired``
    failed    refused at validation (no files), the error message echoing the request's key

``queue_full = N`` makes the next N batches fail for a full queue (``token_limit_exceeded``), as
OpenAI's do past the enqueued-token limit; ``refuse_creates = N`` answers the next N creates 429.
``create_delays`` holds the next creates' answers that many seconds each after the batch is made (a
client that stopped waiting); ``cut_downloads = N`` breaks off the next N file downloads half-way;
``missing_file_status`` answers a create from an unknown file (404, or OpenAI's 400 naming it).

The server counts uploads, creates, lists and polls, and logs each event in order (``events``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler

from openai_server import ScriptedOpenAIServer, last_user_message, scripted_reply

BATCH_ID_RE = re.compile(r"^/v1/batches/([\w-]+)$")
CONTENT_RE = re.compile(r"^/v1/files/([\w-]+)/content$")
LINE_FAULT_RE = re.compile(r"BATCH:(400|500)\b")


class BatchServer(ScriptedOpenAIServer):
    """The local OpenAI server with the Batch API's routes in place of chat completions."""

    def __init__(self, api_key: str | None = None, polls_to_finish: int | None = 2, page_size: int = 100):
        super().__init__(api_key=api_key)  # the key it checks, ``fixed``, the lock, the HTTP server
        self.polls_to_finish = polls_to_finish
        self.page_size = page_size  # at most this many batches a list page, whatever limit asks
        self.mode = "complete"
        self.hold_create = False  # store a created batch, then never answer: a client killed while creating
        self.queue_full = self.refuse_creates = self.cut_downloads = 0
        self.create_delays: list[float] = []
        self.missing_file_status = 404
        self.files: dict[str, bytes] = {}
        self.inputs: dict[str, list[dict]] = {}  # input file id → its request lines
        self.batches: dict[str, dict] = {}  # id → the batch object, in creation order
        self.modes: dict[str, str] = {}
        self.polls: Counter[str] = Counter()
        self.uploads = self.creates = self.lists = 0
        self.events: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    def batch_inputs(self) -> list[list[dict]]:
        """The request lines of each created batch, in creation order."""
        return [self.inputs[batch["input_file_id"]] for batch in self.batches.values()]

    def custom_ids(self) -> list[set[str]]:
        return [{line["custom_id"] for line in lines} for lines in self.batch_inputs()]

    def add_batches(self, count: int) -> None:
        """Batches of other work, newer than any so far (a busy account's list)."""
        with self.lock:
            for _ in range(count):
                file_id = self._new_file(b"")
                self.inputs[file_id] = []
                self._new_batch(file_id, {"metadata": None})

    # ---------------------------------------------------------------- state

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _new_file(self, data: bytes) -> str:
        file_id = self._new_id("file")
        self.files[file_id] = data
        return file_id

    def _file_object(self, file_id: str, purpose: str, filename: str) -> dict:
        return {"id": file_id, "object": "file", "bytes": len(self.files[file_id]), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}  # fmt: skip

    def _new_batch(self, file_id: str, request: dict) -> dict:
        batch = {"id": self._new_id("batch"), "object": "batch", "endpoint": "/v1/chat/completions",
                 "input_file_id": file_id, "completion_window": "24h", "status": "validating",
                 "created_at": int(time.time()), "metadata": request.get("metadata"), "output_file_id": None,
                 "error_file_id": None, "errors": None,
                 "request_counts": {"total": len(self.inputs[file_id]), "completed": 0, "failed": 0}}  # fmt: skip
        self.batches[batch["id"]] = batch
        self.modes[batch["id"]] = "queue_full" if self.queue_full > 0 else self.mode
        self.queue_full -= self.queue_full > 0
        return batch

    def _poll(self, batch: dict, authorization: str) -> dict:
        if batch["status"] in ("completed", "expired", "failed", "cancelled"):
            return batch
        self.polls[batch["id"]] += 1
        if self.polls_to_finish is None or self.polls[batch["id"]] < self.polls_to_finish:
            batch["status"] = "in_progress"
            return batch
        mode = self.modes[batch["id"]]
        if mode == "failed":
            error = {"code": "invalid_request", "message": f"line 1: the model is not available to the key "
                     f"{authorization}", "line": 1, "param": "body.model"}  # fmt: skip
        elif mode == "queue_full":
            error = {"code": "token_limit_exceeded", "message": "Enqueued token limit reached. Please try again "
                     "once some in_progress batches have been completed."}  # fmt: skip
        if mode in ("failed", "queue_full"):
            batch.update(status="failed", errors={"object": "list", "data": [error]})
            return batch
        lines = self.inputs[batch["input_file_id"]]
        done = lines[: (len(lines) + 1) // 2] if mode == "expired" else lines
        answered = [self._result(n, line) for n, line in enumerate(done)]
        errors = [r for r in answered if r["response"]["status_code"] != 200]
        errors += [{"id": f"batch_req_x{n}", "custom_id": line["custom_id"], "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                              "completion window expired."}} for n, line in enumerate(lines[len(done):])]  # fmt: skip
        output = [r for r in answered if r["response"]["status_code"] == 200]
        batch["status"] = "expired" if mode == "expired" else "completed"
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        for name, records in (("output_file_id", output), ("error_file_id", errors)):
            if records:
                data = "".join(json.dumps(r) + "\n" for r in records).encode()
                batch[name] = self._new_file(data)
        return batch

    def _result(self, n: int, line: dict) -> dict:
        body = line["body"]
        user = last_user_message(body["messages"])
        fault = LINE_FAULT_RE.search(user)
        if fault and not self.fixed:
            status = int(fault.group(1))
            reply = {"error": {"message": f"scripted failure {status}", "type": "invalid_request_error"}}
        else:
            status, text = 200, scripted_reply(body["messages"])
            reply = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split())}}  # fmt: skip
        response = {"status_code": status, "request_id": f"req-{n}", "body": reply}
        return {"id": f"batch_req_{n}", "custom_id": line["custom_id"], "response": response, "error": None}

    def _page(self, query: dict[str, str]) -> dict:
        newest_first = list(reversed(self.batches.values()))
        after = query.get("after")
        if after:
            newest_first = newest_first[[b["id"] for b in newest_first].index(after) + 1 :]
        page = newest_first[: min(int(query.get("limit", 20)), self.page_size)]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(newest_first) > len(page)}  # fmt: skip

    # ---------------------------------------------------------------- HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_BatchHandler,), {"outer": self})


class _BatchHandler(BaseHTTPRequestHandler):
    """The routes; ``outer`` is the BatchServer whose state they read and change."""

    outer: BatchServer

    def log_message(self, *args) -> None:
        return

    def _send(self, status: int, body: bytes | dict, content_type: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_cut(self, data: bytes) -> None:
        """Half of a file's bytes under its full length, then the connection closed."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _authorized(self) -> bool:
        authorization = self.headers.get("Authorization", "")
        with self.outer.lock:
            self.outer.authorization.add(authorization)
        if self.outer.api_key and authorization != f"Bearer {self.outer.api_key}":
            self._send(401, {"error": {"message": "bad key"}})
            return False
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/files":
            self._upload()
        elif self.path == "/v1/batches":
            self._create(json.loads(self._body()))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _upload(self) -> None:
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        form = BytesParser(policy=HTTP).parsebytes(head + self._body())
        parts = {p.get_param("name", header="content-disposition"): p for p in form.iter_parts()}
        if parts["purpose"].get_content() != "batch":
            self._send(400, {"error": {"message": "purpose must be batch"}})
            return
        data = parts["file"].get_payload(decode=True)
        with self.outer.lock:
            file_id = self.outer._new_file(data)
            self.outer.inputs[file_id] = [json.loads(line) for line in data.decode().splitlines()]
            self.outer.uploads += 1
            self.outer.events.append(("upload", file_id))
            created = self.outer._file_object(file_id, "batch", parts["file"].get_filename())
        self._send(200, created)

    def _create(self, request: dict) -> None:
        with self.outer.lock:
            if self.outer.refuse_creates > 0:
                self.outer.refuse_creates -= 1
                self._send(429, {"error": {"message": "too many batches at once"}})
                return
            if request.get("input_file_id") not in self.outer.inputs:
                status = self.outer.missing_file_status
                message = "no such file" if status == 404 else f"invalid input_file_id {request.get('input_file_id')}"
                self._send(status, {"error": {"message": message}})
                return
            batch = self.outer._new_batch(request["input_file_id"], request)
            self.outer.creates += 1
            self.outer.events.append(("create", batch["id"]))
        if self.outer.hold_create:
            time.sleep(60)  # the client is killed while it waits
            return
        with self.outer.lock:
            delay = self.outer.create_delays.pop(0) if self.outer.create_delays else 0.0
        time.sleep(delay)
        with contextlib.suppress(OSError):  # the client gave up on it
            self._send(200, batch)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path, _, query = self.path.partition("?")
        batch_id, content_id = BATCH_ID_RE.match(path), CONTENT_RE.match(path)
        with self.outer.lock:
            if path == "/v1/batches":
                self.outer.lists += 1
                self.outer.events.append(("list", query))
                self._send(200, self.outer._page(dict(p.split("=", 1) for p in query.split("&") if p)))
            elif batch_id and batch_id.group(1) in self.outer.batches:
                self.outer.events.append(("poll", batch_id.group(1)))
                batch = self.outer._poll(self.outer.batches[batch_id.group(1)], self.headers.get("Authorization", ""))
                self._send(200, batch)
            elif content_id and content_id.group(1) in self.outer.files:
                self.outer.events.append(("content", content_id.group(1)))
                data = self.outer.files[content_id.group(1)]
                if self.outer.cut_downloads > 0:
                    self.outer.cut_downloads -= 1
                    self._send_cut(data)
                else:
                    self._send(200, data, "application/octet-stream")
            else:
                self._send(404, {"error": {"message": f"no such object {path}"}})

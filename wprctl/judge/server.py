"""A small OpenAI-compatible chat-completions server for tests, benchmarks and the offline demo.

It speaks enough of the API for the official `openai` client (`POST /v1/chat/completions`,
`GET /v1/models`), runs in a background thread on 127.0.0.1 and a free port, and answers through
a pluggable *responder*: a callable `(messages, model) -> str | Reply`. Returning a string sends
a normal completion; returning a `Reply` scripts a behaviour (429 with Retry-After, a 5xx, a
delay long enough to time out, a malformed body, a refusal).

It counts requests per prompt (the last user message) so tests can assert that a rerun repeated
no finished judgement.

    with JudgeServer(responder=lambda messages, model: "A", latency=0.2) as base_url:
        ...  # point `wprctl judge --base-url` or an openai client at base_url
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Messages = list[dict[str, Any]]


@dataclass
class Reply:
    """A scripted answer. `text` is the completion; the other fields change how it is delivered."""

    text: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # sent verbatim instead of a JSON completion (malformed bodies)
    delay: float = 0.0  # seconds on top of the server's latency (exceed a client timeout)
    refusal: str | None = None
    finish_reason: str = "stop"

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Reply:
        return cls(status=429, headers={"Retry-After": f"{retry_after:g}"})

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls(status=status)

    @classmethod
    def malformed(cls, body: bytes = b'{"id": "x", "choices": [{"message": ') -> Reply:
        return cls(body=body)

    @classmethod
    def hang(cls, seconds: float) -> Reply:
        return cls(text="A", delay=seconds)

    @classmethod
    def refused(cls, text: str = "I'm sorry, but I can't help with that request.") -> Reply:
        return cls(refusal=text)


Responder = Callable[[Messages, str], "str | Reply"]


def prompt_key(messages: Messages) -> str:
    """What requests are counted by: the content of the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content", "")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def fail_first(times: int, failure: Reply, then: Responder) -> Responder:
    """Answer each distinct prompt with `failure` for its first `times` requests, then `then`."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def responder(messages: Messages, model: str) -> str | Reply:
        key = prompt_key(messages)
        with lock:
            seen[key] += 1
            n = seen[key]
        return failure if n <= times else then(messages, model)

    return responder


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class JudgeServer:
    def __init__(
        self, responder: Responder | None = None, latency: float = 0.0, host: str = "127.0.0.1"
    ) -> None:
        self.responder: Responder = responder or (lambda messages, model: "A")
        self.latency = latency
        self.host = host
        self.counts: Counter[str] = Counter()  # requests received, per prompt
        self.served: Counter[str] = Counter()  # 200 completions sent, per prompt
        self.requests = 0
        self.api_keys_seen: set[str] = set()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> str:
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer((self.host, 0), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # a hanging scripted reply must not block shutdown
        self._httpd = httpd
        # A short poll interval makes stop() quick; tests start and stop many servers.
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="judge-server",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- counting -------------------------------------------------------------------------
    def count(self, messages_or_user_message: Messages | str) -> int:
        key = (
            messages_or_user_message
            if isinstance(messages_or_user_message, str)
            else prompt_key(messages_or_user_message)
        )
        with self._lock:
            return self.counts[key]

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.served.clear()
            self.requests = 0

    # ---- one request ----------------------------------------------------------------------
    def _answer(
        self, payload: dict[str, Any], auth: str | None
    ) -> tuple[int, dict[str, str], bytes, float, str]:
        messages = payload.get("messages") or []
        model = str(payload.get("model", ""))
        key = prompt_key(messages)
        with self._lock:
            self.requests += 1
            self.counts[key] += 1
            if auth:
                self.api_keys_seen.add(auth)
        try:
            result = self.responder(messages, model)
        except Exception as exc:  # a broken responder is a 500, visible to the client
            return 500, {}, _error_body(f"responder failed: {exc!r}", "server_error"), 0.0, key
        reply = result if isinstance(result, Reply) else Reply(text=str(result))
        if reply.body is not None:
            return reply.status, reply.headers, reply.body, reply.delay, key
        if reply.status != 200:
            kind = "rate_limit_exceeded" if reply.status == 429 else "server_error"
            body = _error_body(f"scripted status {reply.status}", kind)
            return reply.status, reply.headers, body, reply.delay, key
        text = reply.text if reply.refusal is None else None
        prompt_text = " ".join(str(m.get("content", "")) for m in messages)
        completion = {
            "id": f"chatcmpl-local-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": reply.refusal},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": _approx_tokens(prompt_text),
                "completion_tokens": _approx_tokens(text or reply.refusal or ""),
                "total_tokens": _approx_tokens(prompt_text) + _approx_tokens(text or ""),
            },
        }
        return 200, reply.headers, json.dumps(completion).encode(), reply.delay, key


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": kind}}).encode()


def _make_handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read counts
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                body = {
                    "object": "list",
                    "data": [
                        {"id": "local-judge", "object": "model", "created": 0, "owned_by": "wprctl"}
                    ],
                }
                self._send(200, {}, json.dumps(body).encode())
            else:
                self._send(404, {}, _error_body(f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {}, _error_body(f"no route {self.path}", "not_found"))
                return
            try:
                payload = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._send(400, {}, _error_body("request body is not JSON", "invalid_request"))
                return
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip() or None
            status, headers, body, delay, key = server._answer(payload, token)
            wait = server.latency + delay
            if wait > 0:
                time.sleep(wait)
            self._send(status, headers, body)
            if status == 200:
                with server._lock:
                    server.served[key] += 1

    return Handler

"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server (the judge tests).

Requests are forwarded to ``upstream`` unchanged unless the instruction in the request (the
user message) carries a marker ``[fault:NAME]``, which selects a behaviour:

- ``unparseable``: the real answer, with its log-probs removed and its text replaced by
  ``"I cannot tell."``;
- ``text-second`` / ``text-first``: the real answer without log-probs, its text replaced by
  the second / first label (``B`` / ``A``): the judge's text must be read;
- ``429once``: 429 with ``Retry-After: 1`` on the first attempt of each request, then pass;
- ``500twice``: 500 on the first two attempts, then pass;
- ``500always``: 500 on every attempt;
- ``slowonce``: the first attempt answers after ``slow_seconds`` (longer than the client's
  timeout), later ones pass.

``status_for_all`` answers every request with that HTTP status (e.g. 401), ``delay`` delays
every forwarded request, and ``die_after=N`` makes the proxy close its socket right after
answering its N-th forwarded request: later connections are refused, as from a dead server.
``attempts`` counts requests per (marker, body) and ``log`` records (time, marker, action).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = re.compile(r"\[fault:([a-z0-9-]+)\]")


class FaultProxy:
    def __init__(self, upstream: str, slow_seconds: float = 3.0):
        self.upstream = upstream.rstrip("/")
        self.slow_seconds = slow_seconds
        self.status_for_all: int | None = None
        self.delay = 0.0
        self.die_after: int | None = None
        self.forwarded = 0
        self.attempts: dict[str, int] = {}
        self.log: list[tuple[float, str | None, str]] = []
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._dying = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._forward(self, None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                proxy._forward(self, self.rfile.read(length))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        if not self._dead.is_set():
            self._dead.set()
            self.server.shutdown()
            self.server.server_close()

    # ------------------------------------------------------------------------ internals

    def _action(self, body: bytes | None) -> tuple[str | None, str]:
        if body is None:
            return None, "pass"
        request = json.loads(body)
        text = " ".join(str(m.get("content", "")) for m in request.get("messages", []))
        match = MARKER.search(text)
        marker = match.group(1) if match else None
        key = hashlib.sha256(body).hexdigest()
        with self._lock:
            n = self.attempts.get(key, 0)
            self.attempts[key] = n + 1
        if self.status_for_all is not None:
            return marker, f"status:{self.status_for_all}"
        action = {
            None: "pass",
            "unparseable": "rewrite:I cannot tell.",
            "text-second": "rewrite:B",
            "text-first": "rewrite:A",
            "429once": "status:429" if n == 0 else "pass",
            "500twice": "status:500" if n < 2 else "pass",
            "500always": "status:500",
            "slowonce": "slow" if n == 0 else "pass",
        }[marker]
        return marker, action

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> None:
        if self._dying.is_set():  # dead: drop the connection without an answer
            handler.close_connection = True
            return
        marker, action = self._action(body)
        self.log.append((time.monotonic(), marker, action))
        if action.startswith("status:"):
            status = int(action.split(":")[1])
            headers = {"Retry-After": "1"} if status == 429 else {}
            self._send(handler, status, json.dumps(
                {"error": {"message": f"injected {status}", "type": "injected"}}).encode(),
                headers)
            return
        if action == "slow":
            time.sleep(self.slow_seconds)
        if self.delay:
            time.sleep(self.delay)
        request = urllib.request.Request(self.upstream + handler.path.removeprefix("/v1"),
                                         data=body, method=handler.command,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        if action.startswith("rewrite:") and status == 200:
            data = json.loads(payload)
            for choice in data.get("choices", []):
                choice["message"]["content"] = action.split(":", 1)[1]
                choice["logprobs"] = None
            payload = json.dumps(data).encode()
        self._send(handler, status, payload, {})
        if body is not None:
            with self._lock:
                self.forwarded += 1
                dying = self.die_after is not None and self.forwarded >= self.die_after
            if dying:
                self._dying.set()
                handler.close_connection = True
                threading.Thread(target=self.close, daemon=True).start()

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes,
              headers: dict[str, str]) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

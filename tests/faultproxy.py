"""A small HTTP proxy in front of the real MLflow server that injects faults on chosen requests.

Used to produce, for real, what a tracking server does in production: 5xx answers, and outages
(the proxy stops accepting connections for a while, as a restarting server does). Loopback only.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

# The body of a real version-create request (the permission probe sends none: model_registry.py).
SOURCE = r'"source"'


@dataclass
class Rule:
    method: str
    path: str  # regex on the request path
    action: str  # "500": answer 500 | "outage": refuse everything for `seconds`, starting with this request
    # | "kill": call the proxy's `on_kill` (the test kills the real server there), then drop the connection
    seconds: float = 0.0
    times: int = 10**9  # how many matching requests it applies to
    hits: int = 0
    body: str = ""  # regex on the request body too (e.g. a version-create with a source, not the permission probe)


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)
    down_until: float = 0.0
    on_kill: object = None  # a callable, for "kill" rules
    killed_at: float | None = None  # time.monotonic() of the kill

    def __post_init__(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _handle(self):
                body = self._body()
                path = self.path.split("?", 1)[0]
                if time.monotonic() < proxy.down_until:
                    self.close_connection = True
                    self.connection.close()  # a dead server: the connection just goes away
                    proxy.log.append((self.command, path, -1))
                    return
                for rule in proxy.rules:
                    if (
                        rule.method == self.command
                        and re.search(rule.path, path)
                        and re.search(rule.body, (body or b"").decode("utf-8", "replace"))
                        and rule.hits < rule.times
                    ):
                        rule.hits += 1
                        if rule.action == "500":
                            self.send_response(500)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            proxy.log.append((self.command, path, 500))
                            return
                        if rule.action == "kill":
                            proxy.killed_at = time.monotonic()
                            proxy.on_kill()
                            self.close_connection = True
                            self.connection.close()
                            proxy.log.append((self.command, path, -1))
                            return
                        if rule.action == "outage":
                            proxy.down_until = time.monotonic() + rule.seconds
                            self.close_connection = True
                            self.connection.close()
                            proxy.log.append((self.command, path, -1))
                            return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection", "transfer-encoding")
                }
                try:
                    resp = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=60)
                except requests.RequestException:  # the server behind is gone: so is this connection
                    self.close_connection = True
                    self.connection.close()
                    proxy.log.append((self.command, path, -1))
                    return
                self.send_response(resp.status_code)
                for key, value in resp.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)
                proxy.log.append((self.command, path, resp.status_code))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

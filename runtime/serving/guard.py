"""A request guard in front of tritonserver's HTTP endpoint: shapes are checked before Triton allocates.

tritonserver 2.51 (pytriton 0.7.0) parses an HTTP/JSON inference request by allocating a buffer of the
size its `shape` declares, before comparing it with the data sent or with the model's max_batch_size: one
request declaring [100000000, 3, 32, 32] with one byte of data asked for 307 GB, and the refused
allocation killed the whole server. So `clipfuse serve` binds its public HTTP port here and
runs tritonserver's HTTP endpoint on a loopback port behind it:

- an inference request (POST /v2/models/<m>[/versions/<v>]/infer) is parsed (its JSON header only: the
  binary tensors after `Inference-Header-Content-Length` are not read as JSON) and each input's shape is
  checked against the IO spec (known names, [N, *dims] with the model's dims, 1 <= N <= max_batch_size);
  a bad one is answered 400 with Triton's error body ({"error": ...}), so clients read it as any Triton
  error, and never reaches tritonserver;
- every request body is bounded (413 past MAX_BODY_FACTOR x the largest valid request, counted as JSON
  text), and chunked bodies are refused (411): the guard reads each body whole, so it must know its size;
- everything else (health, metadata, config, statistics with its token header) is forwarded unchanged.
gRPC keeps Triton's own front end, which refuses the same request itself ("inference request batch-size
must be <= 8", the server staying up: tests/runtime/test_serve.py).
"""
from __future__ import annotations

import http.client
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import prod

_INFER = re.compile(r"^/v2/models/[^/?]+(/versions/[^/?]+)?/infer/?(\?.*)?$")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "host"}
MAX_BODY_FACTOR = 8         # JSON text of uint8 pixels: up to 4 characters per value ("255,"), twice that
UPSTREAM_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Limits:
    inputs: dict                # input name -> per-image dims, e.g. {"image_224": (3, 224, 224)}
    max_batch: int              # the model config's max_batch_size

    @property
    def max_body(self) -> int:
        return MAX_BODY_FACTOR * self.max_batch * sum(prod(d) for d in self.inputs.values()) + (1 << 20)


def check_request(header, limits: Limits) -> str | None:
    """Why an inference request's JSON header must not reach Triton, or None when its shapes are valid."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return "the request needs 'inputs', a list of tensors"
    for t in inputs:
        name = t.get("name") if isinstance(t, dict) else None
        if name not in limits.inputs:
            return f"unknown input {name!r}; the model takes {sorted(limits.inputs)}"
        dims, shape = limits.inputs[name], t.get("shape")
        want = f"[N, {', '.join(map(str, dims))}] with N in 1..{limits.max_batch} (max_batch_size)"
        if (not isinstance(shape, list) or len(shape) != len(dims) + 1
                or not all(type(d) is int for d in shape) or tuple(shape[1:]) != tuple(dims)
                or not 1 <= shape[0] <= limits.max_batch):
            return f"input {name!r} has shape {json.dumps(shape)[:200]}; the model takes {want}"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "RequestGuard"

    def log_message(self, *args) -> None:      # tritonserver logs requests; the guard stays quiet
        pass

    def _reply(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, "send the request with a Content-Length (chunked bodies are not accepted)")
            return None
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= self.server.limits.max_body:
            self.close_connection = True
            self._reply(413, f"request body of {n} bytes is outside 0..{self.server.limits.max_body} bytes")
            return None
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        body = self._body()
        if body is None:
            return
        if self.command == "POST" and _INFER.match(self.path):
            why = self._check(body)
            if why is not None:
                self._reply(400, why)
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        try:
            conn = self.server.upstream()
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.server.drop_upstream()
            self._reply(502, f"the Triton server behind this port did not answer ({type(e).__name__})")
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _check(self, body: bytes) -> str | None:
        size = self.headers.get("Inference-Header-Content-Length")
        try:
            head = body[:int(size)] if size is not None else body
            header = json.loads(head)
        except (ValueError, UnicodeDecodeError):
            return "the request's JSON header cannot be parsed"
        return check_request(header, self.server.limits)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward


class RequestGuard(ThreadingHTTPServer):
    """Listens on (host, port); forwards to tritonserver's HTTP endpoint at 127.0.0.1:upstream_port."""

    daemon_threads = True

    def __init__(self, host: str, port: int, upstream_port: int, limits: Limits):
        super().__init__((host, port), _Handler)
        self.limits, self.upstream_port = limits, upstream_port
        self._local = threading.local()
        self._thread = threading.Thread(target=self.serve_forever, name="clipfuse-guard", daemon=True)

    def upstream(self) -> http.client.HTTPConnection:
        """This handler thread's keep-alive connection to tritonserver."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port,
                                                                 timeout=UPSTREAM_TIMEOUT_S)
        return conn

    def drop_upstream(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.close()

    def start(self) -> "RequestGuard":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
        self.server_close()

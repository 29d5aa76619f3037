"""A fault-injecting HTTP proxy on 127.0.0.1, between gppy and the moto S3 endpoint.

Each request is forwarded to the endpoint unless the seeded schedule picks a fault for it: the
connection dropped (before forwarding, or after, so the request took effect but its answer was
lost), a 500 InternalError, a 503 SlowDown, added latency, a body cut short (the full
Content-Length announced, fewer bytes sent) or a body damaged in one byte (same length, so only a
checksum can tell: so only whole-object GETs, which carry S3's checksum, are damaged that way). Faults are bounded: a request signature (method, path, range) never gets more
than ``max_in_a_row`` faults in a row, so a client that retries enough always gets through.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("drop", "drop_after", "500", "503", "latency", "truncate", "corrupt")
BODY_FAULTS = ("truncate", "corrupt")  # only where there is a body to damage: a GET's answer

_ERROR_XML = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{msg}</Message>"
              "<RequestId>faultproxy</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, faults=FAULTS, max_in_a_row: int = 2,
                 latency_s: float = 0.2):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rate, self.faults, self.max_in_a_row, self.latency_s = rate, tuple(faults), max_in_a_row, latency_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_a_row: Counter = Counter()
        self.injected: Counter = Counter()
        self.requests = 0
        self.most_in_a_row = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the test reports the counts
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, signature: tuple, method: str) -> str | None:
        with self._lock:
            self.requests += 1
            # bodies are damaged only where S3 gives the client a way to tell: a whole object's GET
            # (a listing, or a range, has no checksum; a cut one still shows by its length)
            whole_object = method == "GET" and "?" not in signature[1]
            allowed = [f for f in self.faults if f not in BODY_FAULTS or (whole_object and (
                f == "truncate" or signature[2] is None))]
            if not allowed or self._in_a_row[signature] >= self.max_in_a_row or self._rng.random() >= self.rate:
                self._in_a_row[signature] = 0
                return None
            fault = self._rng.choice(allowed)
            self._in_a_row[signature] += 1
            self.most_in_a_row = max(self.most_in_a_row, self._in_a_row[signature])
            self.injected[fault] += 1
            return fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._pick((h.command, h.path, h.headers.get("Range")), h.command)
        if fault == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("500", "503"):
            code, name = (500, "InternalError") if fault == "500" else (503, "SlowDown")
            self._reply(h, code, {"Content-Type": "application/xml"},
                        _ERROR_XML.format(code=name, msg="injected by faultproxy").encode())
            return
        if fault == "latency":
            time.sleep(self.latency_s)
        status, headers, payload = self._forward(h, body)
        if fault == "drop_after":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "truncate" and len(payload) > 1:
            self._reply(h, status, headers, payload[: len(payload) // 2], announce=len(payload))
            h.close_connection = True
            return
        if fault == "corrupt" and payload:
            i = len(payload) // 2
            payload = payload[:i] + bytes([payload[i] ^ 0x5A]) + payload[i + 1:]
        self._reply(h, status, headers, payload)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            kept = {k: v for k, v in resp.getheaders()
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server",
                                         "date")}
            if h.command == "HEAD":  # no body came, but the client wants the object's size
                kept["Content-Length"] = resp.getheader("Content-Length", "0")
            return resp.status, kept, payload
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict, payload: bytes,
               announce: int | None = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(announce if announce is not None else len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
        h.wfile.flush()

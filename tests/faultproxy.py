"""A fault-injecting HTTP proxy for tests: sits between the job and the S3 server on 127.0.0.1.

The job's `AWS_ENDPOINT_URL_S3` points at the proxy; every request is forwarded unchanged (Host
header included, so SigV4 signatures still verify) to the real server, except that a seeded share
of them first gets a fault: a `503 SlowDown` answer, a connection reset (RST, no answer), or a slow
answer. Faults are bounded: the same request (method + path + query) is failed at most
`max_faults_per_request` times in a row, so a client that retries as S3 clients must will always
get through. `rewrite` replaces byte strings in response bodies, to play a server that returns what
SeaweedFS never would (a key with `..`, which AWS S3 does accept). `corrupt_uploads` flips one
byte in that many upload bodies, as a damaged network path would; the checksum must catch it.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("503", "reset", "slow")
SLOW_S = 0.4  # well under the job's read timeout: slow, not dead
UPSTREAM_TIMEOUT_S = 30.0
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
               "proxy-connection"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """`with FaultProxy(upstream_url, fault_rate=0.3) as proxy:` then use `proxy.url`."""

    def __init__(self, upstream_url: str, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, max_faults_per_request: int = 2, rewrite: dict[bytes, bytes] | None = None,
                 corrupt_uploads: int = 0):
        upstream = urlparse(upstream_url)
        self.upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self.fault_rate = fault_rate
        self.faults = faults
        self.max_faults_per_request = max_faults_per_request
        self.rewrite = rewrite or {}
        self.corrupt_uploads = corrupt_uploads  # how many more PUT bodies get one byte flipped
        self.injected: Counter[str] = Counter()  # fault kind → how many were injected
        self.requests = 0
        self._random = random.Random(seed)
        self._failed_in_a_row: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def take_corruption(self) -> bool:
        with self._lock:
            if self.corrupt_uploads <= 0:
                return False
            self.corrupt_uploads -= 1
            self.injected["corrupt"] += 1
            return True

    def choose_fault(self, request_id: str) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            if self._failed_in_a_row[request_id] >= self.max_faults_per_request or self._random.random() >= self.fault_rate:
                self._failed_in_a_row[request_id] = 0
                return None
            fault = self._random.choice(self.faults)
            if fault != "slow":  # a slow answer is still an answer
                self._failed_in_a_row[request_id] += 1
            self.injected[fault] += 1
            return fault


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered here

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
            pass

        def _relay(self) -> None:
            body = self._read_body()
            if self.command == "PUT" and body and proxy.take_corruption():
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
            fault = proxy.choose_fault(f"{self.command} {self.path}")
            if fault == "reset":
                # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault == "503":
                self._answer(503, [("Content-Type", "application/xml")], _SLOW_DOWN)
                return
            if fault == "slow":
                time.sleep(SLOW_S)
            status, headers, payload = self._forward(body)
            for old, new in proxy.rewrite.items():
                payload = payload.replace(old, new)
            self._answer(status, headers, payload)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size_line = self.rfile.readline()
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        upstream.putheader(name, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                payload = response.read()
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                return response.status, headers, payload
            finally:
                upstream.close()

        def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() == "content-length" and self.command == "HEAD":
                    self.send_header(name, value)  # HEAD: the object's size, no body follows
                elif name.lower() != "content-length":
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler

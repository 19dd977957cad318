"""Streamed uploads on a blocking TLS socket in a worker thread.

Through asyncio's TLS transport a chunk is copied four times and encrypted on
the event loop, which then cannot keep up: the state channel moved about a
quarter of what Python's blocking TLS socket moves on the same path. Here the
worker thread encrypts straight into the socket (OpenSSL drops the GIL while
it does) and the event loop only hands chunks over.

The request is plain HTTP/1.1 with chunked transfer encoding, so the peer
server handles it like any other upload. The peer's identity is checked right
after the handshake, as PeerClient's connections do, before a byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterable, Iterator, Mapping
from urllib.parse import urlsplit

from agent.bridges import feed_blocking_consumer
from agent.peer.tls import check_peer_name

_END_CHUNKS = b"0\r\n\r\n"


class UploadTimeout(TimeoutError):
    pass


class BulkUpload:
    """One PUT of a body produced chunk by chunk; `abort` unblocks it from another thread."""

    def __init__(
        self,
        base_url: str,
        peer_name: str,
        ssl_ctx: ssl.SSLContext,
        *,
        connect_timeout: float,
        idle_timeout: float,
        total_timeout: float | None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"peer address {base_url!r} needs a host and a port")
        self.host, self.port = parts.hostname, parts.port
        self.peer_name = peer_name
        self.ssl_ctx = ssl_ctx
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._aborted = False

    def abort(self) -> None:
        """Wake a send blocked on a full socket buffer: it fails at once."""
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def run(
        self, path: str, headers: Mapping[str, str], chunks: Iterator[bytes]
    ) -> tuple[int, bytes]:
        """Blocking: send the request, return (status, body). Raises OSError / ssl.SSLError."""
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            raw.settimeout(self.idle_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ssl_ctx.wrap_socket(raw, server_hostname=self.peer_name)
        except BaseException:
            raw.close()
            raise
        with tls:
            check_peer_name(tls.getpeercert(), self.peer_name)
            with self._lock:
                if self._aborted:
                    raise ConnectionAbortedError("upload aborted")
                self._sock = tls
            head = [f"PUT {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            head += [
                "Content-Type: application/octet-stream",
                "Transfer-Encoding: chunked",
                "Expect: 100-continue",
                "Connection: close",
            ]
            # The headers leave at once, before the producer's first chunk (`docker
            # save` may take long to produce it), so the peer's header timeout never
            # cuts a slow producer, and the peer can refuse before any of the body.
            tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            status, fields = _read_head(tls)
            if status != 100:
                return status, _read_body(tls, fields)
            try:
                for chunk in chunks:  # an error of the producer propagates as it is
                    if not chunk:
                        continue
                    if deadline is not None and time.monotonic() > deadline:
                        raise UploadTimeout("the upload took longer than its time limit")
                    # Three writes rather than one joined copy of a MiB-sized chunk.
                    _send(tls, b"%x\r\n" % len(chunk))
                    _send(tls, chunk)
                    _send(tls, b"\r\n")
                _send(tls, _END_CHUNKS)
            except _SendFailed as failed:
                # The peer may have refused and closed early: its answer says why.
                answer = None if self._aborted else _answer_if_any(tls)
                if answer is not None:
                    return answer
                raise failed.error from None
            resp = http.client.HTTPResponse(tls)
            resp.begin()
            return resp.status, resp.read()


_MAX_HEAD = 64 << 10


def _read_head(tls: ssl.SSLSocket) -> tuple[int, dict[str, str]]:
    """The status and header fields of the peer's (interim) answer."""
    buf = bytearray()
    while not buf.endswith(b"\r\n\r\n"):
        more = tls.recv(1)  # byte by byte: what follows the head is not ours to take
        if not more:
            raise http.client.RemoteDisconnected("the peer closed the connection before an answer")
        buf += more
        if len(buf) > _MAX_HEAD:
            raise http.client.LineTooLong("answer head")
    lines = buf.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0])
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return int(parts[1]), fields


def _read_body(tls: ssl.SSLSocket, fields: dict[str, str]) -> bytes:
    length = fields.get("content-length", "")
    if not length.isdigit() or int(length) > _MAX_HEAD:
        return b""  # a refusal without a readable body still has its status
    want, body = int(length), bytearray()
    while len(body) < want:
        more = tls.recv(want - len(body))
        if not more:
            break
        body += more
    return bytes(body)


class _SendFailed(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _send(tls: ssl.SSLSocket, data: bytes) -> None:
    try:
        tls.sendall(data)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise _SendFailed(exc) from exc


def _answer_if_any(tls: ssl.SSLSocket) -> tuple[int, bytes] | None:
    with contextlib.suppress(Exception):
        tls.settimeout(2.0)
        resp = http.client.HTTPResponse(tls)
        resp.begin()
        return resp.status, resp.read()
    return None


async def bulk_put(
    upload: BulkUpload,
    path: str,
    headers: Mapping[str, str],
    chunks: AsyncIterable[bytes],
) -> tuple[int, bytes]:
    """Run `upload` in a thread, fed from `chunks`; cancelling it aborts the socket at once."""
    task = asyncio.ensure_future(
        feed_blocking_consumer(chunks, lambda it: upload.run(path, headers, it))
    )
    try:
        return await asyncio.shield(task)
    except BaseException:
        upload.abort()  # a thread blocked in a send would otherwise wait out the idle timeout
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    finally:
        # Close the producer here rather than leave it to the event loop's finalizer.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

"""Uploads on a blocking TLS socket: prompt abort, never a short body, early refusal."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.peer import certs
from agent.peer.client import PeerClient, PeerRefused, PeerTimeouts
from agent.peer.tls import client_context, server_context
from tests.helpers import run_async


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca: Path = tmp_path_factory.mktemp("pki")
    certs.init_ca(ca)
    for host in ("alpha", "beta"):
        certs.issue_host_cert(ca, host, ips=("127.0.0.1",))
    server = server_context(ca / "ca.crt", ca / "alpha.crt", ca / "alpha.key")
    client = client_context(ca / "ca.crt", ca / "beta.crt", ca / "beta.key")
    return server, client


class RawPeer:
    """A one-connection TLS peer whose behaviour after the request head a test chooses."""

    def __init__(self, ctx: ssl.SSLContext, after_head: Callable[[ssl.SSLSocket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.head = b""
        self.body = b""
        self.release = threading.Event()
        self._ctx, self._after = ctx, after_head
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with self._ctx.wrap_socket(conn, server_side=True) as tls:
            while b"\r\n\r\n" not in self.head:
                self.head += tls.recv(1)
            self._after(tls)

    def read_to_end(self, tls: ssl.SSLSocket) -> None:
        with_more = True
        while with_more:
            try:
                more = tls.recv(1 << 16)
            except OSError:
                more = b""
            self.body += more
            with_more = bool(more)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        # Joined here, before the test's assertions read what the peer saw.
        self.release.set()
        self.thread.join(10)
        self.sock.close()
        if kind is None:  # never hide the test's own failure behind this one
            assert not self.thread.is_alive(), "the peer thread is still serving"


def _client(port: int, ctx: ssl.SSLContext) -> PeerClient:
    # A long idle timeout: only the abort can end a blocked send quickly.
    return PeerClient("alpha", f"127.0.0.1:{port}", ctx, PeerTimeouts(idle=60.0))


def test_cancelling_a_blocked_upload_returns_at_once(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = contexts
    peer: RawPeer

    def never_read(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        peer.release.wait(30)  # the body is never read: the client's sends fill the buffers

    peer = RawPeer(server_ctx, never_read)
    pulled = [0]

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * (1 << 20)
        while True:
            pulled[0] += 1
            yield chunk

    async def go() -> float:
        async with _client(peer.port, client_ctx) as c:
            task = asyncio.ensure_future(c.upload_state("m1", endless()))
            deadline = time.monotonic() + 20
            last = -1
            while pulled[0] != last:  # until the producer is no longer pulled: sends block
                last = pulled[0]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)  # the interval compared, not a synchronisation
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

    with peer:
        assert run_async(go()) < 5.0
    assert pulled[0] > 1


def test_a_failing_producer_never_ends_the_body(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The peer must see a broken upload, never a complete body that is short."""
    server_ctx, client_ctx = contexts
    peer: RawPeer

    def read_all(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        peer.read_to_end(tls)

    peer = RawPeer(server_ctx, read_all)

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise RuntimeError("packer broke")

    async def go() -> None:
        async with _client(peer.port, client_ctx) as c:
            await c.upload_state("m1", broken())

    with peer, pytest.raises(RuntimeError, match="packer broke"):
        run_async(go())
    assert b"a" * 1000 in peer.body
    assert not peer.body.endswith(b"0\r\n\r\n")
    assert b"Expect: 100-continue" in peer.head


def test_a_refusal_before_the_body_is_read_and_nothing_is_produced(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = contexts
    answer = json.dumps({"error": "draining", "reason": "host is draining"}).encode()

    def refuse(tls: ssl.SSLSocket) -> None:
        tls.sendall(
            b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n".encode()
            + answer
        )

    peer = RawPeer(server_ctx, refuse)
    pulled = [0]

    async def producer() -> AsyncIterator[bytes]:
        pulled[0] += 1
        yield b"never sent"

    async def go() -> None:
        async with _client(peer.port, client_ctx) as c:
            await c.upload_state("m1", producer())

    with peer, pytest.raises(PeerRefused, match="host is draining") as info:
        run_async(go())
    assert info.value.status == 409
    assert pulled[0] <= 1  # at most the one chunk the hand-off takes ahead; never sent

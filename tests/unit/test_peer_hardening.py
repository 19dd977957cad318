"""The peer API against clients that misbehave: bounded in count and time, 400 for bad shapes.

A real server on loopback with real mutual TLS; the clients are raw sockets
that do exactly as little as a hostile or broken peer would.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent.peer import certs
from agent.peer.api import migration_path
from agent.peer.client import PeerClient, PeerRefused, PeerTimeouts
from agent.peer.server import PeerServer, make_peer_app, start_peer_server
from tests.helpers import run_async
from tests.unit.test_tls_peer import PREPARE, FakeHandlers, Pki

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0


@pytest.fixture(scope="module", name="pki")
def pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = tmp_path_factory.mktemp("pki") / "ca"
    certs.init_ca(ca)
    for host in ("alpha", "beta"):
        certs.issue_host_cert(ca, host, ips=("127.0.0.1",))
    return Pki(ca, ca)


async def serve(
    pki: Pki,
    handlers: FakeHandlers,
    *,
    max_connections: int = 64,
    header: float = HEADER_TIMEOUT,
    idle: float = IDLE_TIMEOUT,
) -> PeerServer:
    app = make_peer_app(handlers, {"beta"}, 1 << 20, idle_timeout=idle, host_name="alpha")
    return await start_peer_server(
        app,
        "127.0.0.1",
        0,
        pki.server("alpha"),
        max_connections=max_connections,
        header_timeout=header,
    )


async def tls(server: PeerServer, pki: Pki) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=pki.client("beta"), server_hostname="alpha"
    )


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before closing; fails if it keeps the connection longer."""
    data = b""
    async with asyncio.timeout(seconds):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionResetError, ssl.SSLError):
                return data
            if not chunk:
                return data
            data += chunk


def run(pki: Pki, body: Callable[[PeerServer, FakeHandlers], Awaitable[Any]], **kw: Any) -> Any:
    handlers = FakeHandlers()

    async def go() -> Any:
        server = await serve(pki, handlers, **kw)
        try:
            return await body(server, handlers)
        finally:
            await server.close()

    return run_async(go(), timeout=60)


def test_wrongly_shaped_json_gets_400_with_one_line_and_reaches_no_handler(pki: Pki) -> None:
    async def body(server: PeerServer, handlers: FakeHandlers) -> None:
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/v1/migrations", {**PREPARE, "memory_bytes": "lots"}, "body.memory_bytes"),
            ("/v1/migrations", {**PREPARE, "ports": "x"}, "body.ports"),
            ("/v1/migrations", {**PREPARE, "ports": [{"host_port": "80"}]}, "body.ports.0"),
            ("/v1/migrations", {"name": "web"}, "body.migration_id"),
            ("/v1/migrations", {**PREPARE, "state_bytes_estimate": -1}, "body.state_bytes"),
            ("/v1/migrations", {**PREPARE, "name": "../x"}, "body.name"),
            (migration_path("m1", "stage"), {"spec": 5}, "body.spec"),
            ("/v1/check", {"name": "web", "memory_bytes": "lots"}, "body.memory_bytes"),
            ("/v1/check", {"name": "web", "spec": 5}, "body.spec"),
            ("/v1/check", {"ports": [{"host_port": 80}]}, "body.name"),
            (migration_path("m1", "stage"), {}, "body.spec"),
            (migration_path("m1", "restore"), {"digest": 5}, "body.digest"),
            (migration_path("m1", "abort"), {"reason": ["x"]}, "body.reason"),
        ]
        client = PeerClient("alpha", f"127.0.0.1:{server.port}", pki.client("beta"))
        async with client as c:
            for path, payload, where in cases:
                with pytest.raises(PeerRefused) as err:
                    await c.post_json(path, payload)
                assert err.value.status == 400, (payload, err.value)
                assert err.value.reason.startswith(where), (payload, err.value.reason)
                assert "\n" not in err.value.reason and "Traceback" not in err.value.reason
            with pytest.raises(PeerRefused) as err:
                await c.upload_image("m1", _chunks(b"x"), {"image": "r:7"})
            assert err.value.status == 400
            assert err.value.reason.startswith("X-Ferry-Meta.image_id")
            # Extra keys are tolerated and passed on as they were.
            assert await c.post_json("/v1/migrations", {**PREPARE, "future": [1]})
        assert [name for name, _ in handlers.calls] == ["prepare"]
        assert handlers.calls[0][1][1]["future"] == [1]

    run(pki, body)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def test_half_open_and_slow_header_clients_are_dropped_within_the_header_timeout(
    pki: Pki,
) -> None:
    async def body(server: PeerServer, handlers: FakeHandlers) -> float:
        t0 = time.monotonic()
        # No TLS handshake at all.
        raw = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        # A handshake, then half a header.
        half = [await tls(server, pki) for _ in range(5)]
        for _, w in half:
            w.write(b"POST /v1/migrations HTTP/1.1\r\nHost: alpha\r\nContent-Le")
            await w.drain()
        # Slowloris: a byte now and then, never a whole header.
        slow_r, slow_w = await tls(server, pki)

        async def drip() -> None:
            for b in b"GET /v1/health HTTP/1.1\r\nHost: alpha\r\nX-Pad: " + b"a" * 100:
                slow_w.write(bytes([b]))
                await slow_w.drain()
                await asyncio.sleep(0.2)  # the client's pace, not a wait for the server

        dripping = asyncio.ensure_future(drip())
        for r, _ in [*raw, *half, (slow_r, slow_w)]:
            await closed_within(r, HEADER_TIMEOUT + 3)
        took = time.monotonic() - t0
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        for _, w in [*raw, *half, (slow_r, slow_w)]:
            w.close()
        # The server still serves a well-behaved peer.
        async with PeerClient("alpha", f"127.0.0.1:{server.port}", pki.client("beta")) as c:
            assert await c.health() == {"draining": False, "load1": 0.5}
        return took

    took = run(pki, body)
    assert took < HEADER_TIMEOUT + 3


def test_connections_over_the_cap_are_closed_at_once(pki: Pki) -> None:
    async def body(server: PeerServer, handlers: FakeHandlers) -> None:
        held = [await tls(server, pki) for _ in range(3)]  # idle, within their header time
        t0 = time.monotonic()
        over_r, over_w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await closed_within(over_r, 2) == b""
        assert time.monotonic() - t0 < 2, "the extra connection was held"
        over_w.close()
        assert server.gate is not None and server.gate.refused >= 1
        for r, w in held:
            w.close()
            await closed_within(r, 5)
        # Room again once they are gone.
        timeouts = PeerTimeouts(connect=5, request=10)
        async with PeerClient(
            "alpha", f"127.0.0.1:{server.port}", pki.client("beta"), timeouts
        ) as c:
            assert await c.health() == {"draining": False, "load1": 0.5}

    run(pki, body, max_connections=3, header=30.0)


def test_a_stalled_upload_or_json_body_is_cut_after_the_idle_timeout(pki: Pki) -> None:
    async def body(server: PeerServer, handlers: FakeHandlers) -> list[bytes]:
        answers = []
        for head in (
            f"PUT {migration_path('m1', 'state')} HTTP/1.1\r\nHost: alpha\r\n"
            "Content-Length: 100000\r\n\r\n",
            "POST /v1/migrations HTTP/1.1\r\nHost: alpha\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        ):
            r, w = await tls(server, pki)
            w.write(head.encode() + b'{"migration_id": "m1", ')
            await w.drain()
            answers.append(await closed_within(r, IDLE_TIMEOUT + 3))
            w.close()
        return answers

    upload, json_body = run(pki, body, header=30.0)
    for answer in (upload, json_body):
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        reason = json.loads(answer.split(b"\r\n\r\n", 1)[1])["reason"]
        assert "stalled" in reason


def test_an_upload_whose_first_chunk_is_slow_is_not_taken_for_a_half_open_client(
    pki: Pki,
) -> None:
    # The source's first chunk can take a while (docker save exports every layer before
    # it writes a byte); its headers must not wait for it and be cut by the header timeout.
    async def body(server: PeerServer, handlers: FakeHandlers) -> dict[str, Any]:
        async def chunks() -> AsyncIterator[bytes]:
            await asyncio.sleep(HEADER_TIMEOUT * 2.5)  # the producer's pace, not a wait
            yield b"abc"

        async with PeerClient("alpha", f"127.0.0.1:{server.port}", pki.client("beta")) as c:
            return await c.upload_state("m1", chunks())

    assert run(pki, body, idle=HEADER_TIMEOUT * 5) == {"bytes": 3}

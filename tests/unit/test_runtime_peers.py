"""The runtime's peer glue: health polling over real mTLS, and drain-aware peer handlers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from agent.config import PeerConfig
from agent.peer.api import HandlerError
from agent.peer.certs import init_ca, issue_host_cert
from agent.peer.server import make_peer_app, start_peer_server
from agent.peer.tls import client_context, server_context
from agent.service.runtime import DrainAwareHandlers, PeerHealthPoller
from tests.helpers import run_async


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handlers:
    def __init__(self) -> None:
        self.draining = False

    async def health(self) -> dict[str, Any]:
        return {
            "draining": self.draining,
            "load1": 0.5,
            "mem_available_bytes": 1 << 30,
            "running_containers": 3,
            "unknown_future_key": "ignored",
        }

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}


def test_poller_reports_health_identity_errors_and_down_peers(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    a = issue_host_cert(certs, "node-a")
    b = issue_host_cert(certs, "node-b")
    ca = certs / "ca.crt"
    handlers = Handlers()

    async def scenario() -> None:
        app = make_peer_app(handlers, allowed_peers=["node-a"], max_body_bytes=1 << 20)
        server = await start_peer_server(app, "127.0.0.1", 0, server_context(ca, b.cert, b.key))
        peers = [
            PeerConfig(name="node-b", address=f"127.0.0.1:{server.port}", weight=2, tags=["r1"]),
            # Right CA, wrong name: node-b's certificate answers where node-c is expected.
            PeerConfig(name="node-c", address=f"127.0.0.1:{server.port}"),
            PeerConfig(name="node-d", address=f"127.0.0.1:{free_port()}"),
        ]
        poller = PeerHealthPoller(peers, client_context(ca, a.cert, a.key), timeout=5)
        try:
            assert all(not p.reachable for p in poller.peers())
            got = {p.name: p for p in await poller.poll_once()}
            assert got["node-b"].reachable and got["node-b"].running_containers == 3
            assert got["node-b"].weight == 2 and got["node-b"].tags == ("r1",)
            assert not got["node-b"].draining
            assert not got["node-c"].reachable and "node-b" in (got["node-c"].error or "")
            assert not got["node-d"].reachable
            assert (got["node-d"].error or "").startswith("cannot connect")

            handlers.draining = True
            got = {p.name: p for p in await poller.poll_once()}
            assert got["node-b"].draining
        finally:
            await poller.close()
            await server.close()

    run_async(scenario())


def test_drain_aware_handlers() -> None:
    draining = {"on": False}

    class Inner:
        async def health(self) -> dict[str, Any]:
            return {"migrations_in_progress": 1, "reserved_memory_bytes": 300}

        async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
            return {"accepted": peer}

        async def abort(self, peer: str, mid: str, body: dict[str, Any]) -> dict[str, Any]:
            return {"aborted": mid}

    h = DrainAwareHandlers(
        Inner(),
        draining=lambda: draining["on"],
        drain_reason=lambda: "kernel",
        base_health=lambda: {"name": "a", "mem_available_bytes": 1000, "draining": False},
    )

    async def scenario() -> None:
        health = await h.health()
        assert health["mem_available_bytes"] == 700  # reserved memory is not available
        assert health["migrations_in_progress"] == 1 and health["draining"] is False
        assert await h.prepare("b", {}) == {"accepted": "b"}
        draining["on"] = True
        assert (await h.health())["draining"] is True
        with pytest.raises(HandlerError) as err:
            await h.prepare("b", {})
        assert err.value.status == 503 and "draining (kernel)" in err.value.reason
        assert await h.abort("b", "m1", {}) == {"aborted": "m1"}  # everything else passes through

    run_async(scenario())

"""PeerHealthMonitor: answers become PeerHealth, failures and staleness make peers unreachable;
built from the config it polls real peers over mTLS and says in one line why one is not usable."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from agent.config import PeerConfig
from agent.model import PeerHealth
from agent.peer.certs import init_ca, issue_host_cert
from agent.peer.health import PeerHealthMonitor
from agent.peer.server import make_peer_app, start_peer_server
from agent.peer.tls import client_context, server_context
from tests.helpers import FakeClock, run_async


class ScriptedPeer:
    def __init__(self, name: str, *answers: dict[str, Any] | Exception) -> None:
        self.name = name
        self.answers = deque(answers)
        self.polls = 0

    async def health(self) -> dict[str, Any]:
        self.polls += 1
        answer = self.answers.popleft() if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class HangingPeer:
    name = "hang"

    async def health(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_answers_failures_and_staleness() -> None:
    clock = FakeClock()
    a = ScriptedPeer(
        "a",
        {"draining": False, "load1": 1.5, "mem_available_bytes": 2048, "tags": ["ssd"], "x": 1},
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        {"draining": True, "overloaded": True},
    )
    b = ScriptedPeer("b", {"draining": "yes"})
    mon = PeerHealthMonitor([a, b], interval=5, clock=clock, weights={"a": 2.0})
    assert [(p.name, p.reachable, p.error) for p in mon.peers()] == [
        ("a", False, "not polled yet"),
        ("b", False, "not polled yet"),
    ]

    async def go() -> None:
        await mon.poll_once()
        pa, pb = mon.peers()
        assert pa == PeerHealth(
            name="a",
            reachable=True,
            load1=1.5,
            mem_available_bytes=2048,
            tags=("ssd",),
            weight=2.0,
        )
        assert not pb.reachable and pb.error == (
            "peer b: bad health answer: draining must be true or false, not 'yes'"
        )

        await mon.poll_once()
        pa = mon.peers()[0]
        assert (pa.reachable, pa.error, pa.load1) == (False, "peer a: connection refused", 1.5)

        await mon.poll_once()
        pa = mon.peers()[0]
        assert (pa.reachable, pa.draining, pa.overloaded) == (True, True, True)

        clock.advance(16)  # > 3 intervals without a good answer
        pa = mon.peers()[0]
        assert (pa.reachable, pa.error) == (False, "peer a: no answer for 16s")

    run_async(go())


def test_hanging_peer_times_out_without_blocking_others() -> None:
    ok = ScriptedPeer("ok", {"load1": 0.1})
    mon = PeerHealthMonitor([HangingPeer(), ok], interval=5, timeout=0.05, clock=FakeClock())
    run_async(mon.poll_once())
    hang, good = mon.peers()
    assert (hang.reachable, hang.error) == (False, f"peer {hang.name}: timed out")
    assert good.reachable


def test_run_polls_every_interval_until_cancelled() -> None:
    peer = ScriptedPeer("p", {"load1": 0.1})
    sleeps: asyncio.Queue[float] = asyncio.Queue()
    resume = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.put_nowait(seconds)
        await resume.wait()
        resume.clear()

    mon = PeerHealthMonitor([peer], interval=7, clock=FakeClock(), sleep=fake_sleep)

    async def go() -> None:
        task = asyncio.create_task(mon.run())
        assert await sleeps.get() == 7
        assert peer.polls == 1
        resume.set()
        assert await sleeps.get() == 7
        assert peer.polls == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(go())
    assert mon.peers()[0].reachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MtlsHandlers:
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


def test_for_peers_over_mtls_reports_health_config_and_one_line_errors(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_ca(certs)
    a = issue_host_cert(certs, "node-a")
    b = issue_host_cert(certs, "node-b")
    ca = certs / "ca.crt"
    handlers = MtlsHandlers()

    async def scenario() -> None:
        app = make_peer_app(handlers, allowed_peers=["node-a"], max_body_bytes=1 << 20)
        server = await start_peer_server(app, "127.0.0.1", 0, server_context(ca, b.cert, b.key))
        peers = [
            PeerConfig(name="node-b", address=f"127.0.0.1:{server.port}", weight=2, tags=["r1"]),
            # Right CA, wrong name: node-b's certificate answers where node-c is expected.
            PeerConfig(name="node-c", address=f"127.0.0.1:{server.port}"),
            PeerConfig(name="node-d", address=f"127.0.0.1:{free_port()}"),
        ]
        monitor = PeerHealthMonitor.for_peers(peers, client_context(ca, a.cert, a.key), timeout=5)
        try:
            assert all(not p.reachable for p in monitor.peers())
            got = {p.name: p for p in await monitor.poll_once()}
            assert got["node-b"].reachable and got["node-b"].running_containers == 3
            assert got["node-b"].weight == 2 and got["node-b"].tags == ("r1",)
            assert not got["node-b"].draining
            assert not got["node-c"].reachable and "node-b" in (got["node-c"].error or "")
            assert not got["node-d"].reachable
            d_addr = peers[2].address
            assert got["node-d"].error == (
                f"peer node-d at {d_addr}: connection refused (GET /v1/health)"
            )
            assert (got["node-c"].error or "").startswith(f"peer node-c at {peers[1].address}: ")

            handlers.draining = True
            got = {p.name: p for p in await monitor.poll_once()}
            assert got["node-b"].draining
        finally:
            await monitor.close()
            await server.close()

    run_async(scenario())


def test_for_peers_without_tls_lists_every_peer_with_the_reason() -> None:
    peers = [PeerConfig(name="node-b", address="127.0.0.1:1", weight=3, tags=["ssd"])]
    mon = PeerHealthMonitor.for_peers(peers, None)

    async def go() -> None:
        (peer,) = await mon.poll_once()
        assert (peer.reachable, peer.error) == (
            False,
            "peer node-b at 127.0.0.1:1: no TLS client (check tls.* files)",
        )
        assert (peer.weight, peer.tags) == (3, ("ssd",))
        await mon.close()

    run_async(go())

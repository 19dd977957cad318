"""The control socket, served on a real unix socket and driven by the real client."""

from __future__ import annotations

import asyncio
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.service.control import (
    AgentUnreachable,
    AlreadyServing,
    ControlClient,
    ControlRequestFailed,
    ControlServer,
)
from tests.helpers import run_async


class FakeService:
    def __init__(self) -> None:
        self.drained: str | None = None
        self.history_limits: list[int] = []

    async def status(self) -> dict[str, Any]:
        return {"host": "a", "draining": self.drained is not None, "path": Path("/x")}

    async def drain(self, reason: str) -> dict[str, Any]:
        self.drained = reason
        return {"draining": True, "reason": reason}

    async def undrain(self) -> dict[str, Any]:
        self.drained = None
        return {"draining": False}

    async def history(self, limit: int) -> list[dict[str, Any]]:
        self.history_limits.append(limit)
        return [{"container": "web", "ok": True}][:limit]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="fc") as d:
        yield Path(d)


def test_routes_permissions_and_hook(sock_dir: Path) -> None:
    path = sock_dir / "run" / "ferry.sock"
    service = FakeService()

    def hook(app: web.Application) -> None:
        async def ping(request: web.Request) -> web.Response:
            return web.json_response({"pong": True})

        app.router.add_get("/v1/ping", ping)

    async def scenario() -> None:
        server = ControlServer(path, service, route_hooks=[hook])
        await server.start()
        try:
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            client = ControlClient(path)
            assert (await client.status())["draining"] is False
            assert await client.drain("kernel 6.9") == {"draining": True, "reason": "kernel 6.9"}
            status = await client.status()
            assert status["draining"] is True
            assert status["path"] == "/x"  # non-JSON types are shown, not a 500
            assert await client.undrain() == {"draining": False}
            assert await client.history(5) == [{"container": "web", "ok": True}]
            assert service.history_limits == [5]
            assert await client.request("GET", "/v1/ping") == {"pong": True}
            with pytest.raises(ControlRequestFailed) as err:
                await client.request("GET", "/v1/history?limit=0")
            assert err.value.status == 400
            with pytest.raises(ControlRequestFailed, match="reason"):
                await client.request("POST", "/v1/drain", {"reason": 3})
        finally:
            await server.stop()
        assert not path.exists()

    run_async(scenario())


def test_existing_directory_mode_is_left_alone(sock_dir: Path) -> None:
    sock_dir.chmod(0o755)
    path = sock_dir / "ferry.sock"

    async def scenario() -> None:
        server = ControlServer(path, FakeService())
        await server.start()
        try:
            assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o755
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        finally:
            await server.stop()

    run_async(scenario())


def test_stale_socket_is_replaced_but_live_one_is_not(sock_dir: Path) -> None:
    path = sock_dir / "ferry.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves

    async def scenario() -> None:
        first = ControlServer(path, FakeService())
        await first.start()
        try:
            second = ControlServer(path, FakeService())
            with pytest.raises(AlreadyServing):
                await second.start()
            assert (await ControlClient(path).status())["host"] == "a"
        finally:
            await first.stop()

    run_async(scenario())


def test_client_reports_unreachable_agent(sock_dir: Path) -> None:
    async def scenario() -> None:
        missing = sock_dir / "missing.sock"
        with pytest.raises(AgentUnreachable) as gone:
            await ControlClient(missing).status()
        assert str(gone.value) == f"agent at {missing}: no socket (is `ferry run` running?)"
        dead = sock_dir / "dead.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(dead))
        s.close()
        with pytest.raises(AgentUnreachable) as refused:
            await ControlClient(dead).status()
        # One line: who, where, what failed; no aiohttp repr.
        assert str(refused.value) == (
            f"agent at {dead}: connection refused (is `ferry run` running?)"
        )

    run_async(scenario())


def test_every_cli_call_says_unreachable_the_same_way(sock_dir: Path) -> None:
    """`ferry migrate` and `ferry resolve` go through the same client as `ferry status`."""
    from agent.cli import migrate_cmds

    dead = sock_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    expected = f"agent at {dead}: connection refused (is `ferry run` running?)"

    async def scenario() -> None:
        calls = [
            ControlClient(dead).status(),
            migrate_cmds.stream_migration(dead, "web", "b", lambda _: None),
            migrate_cmds._post_resolve(dead, "m1", "source"),
        ]
        for call in calls:
            with pytest.raises(AgentUnreachable) as refused:
                await call
            assert str(refused.value) == expected

    run_async(scenario())


def test_refuses_to_replace_a_regular_file(sock_dir: Path) -> None:
    path = sock_dir / "ferry.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        run_async(ControlServer(path, FakeService()).start())
    assert path.read_text() == "not a socket"


def test_concurrent_requests(sock_dir: Path) -> None:
    path = sock_dir / "ferry.sock"

    async def scenario() -> None:
        server = ControlServer(path, FakeService())
        await server.start()
        try:
            client = ControlClient(path)
            results = await asyncio.gather(*(client.status() for _ in range(10)))
            assert all(r["host"] == "a" for r in results)
        finally:
            await server.stop()

    run_async(scenario())

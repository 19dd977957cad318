"""When something is down or a request is bad, people get one line that says what and where.

Real sockets throughout: a unix socket nobody listens on, a TCP port that was
just closed, a server that accepts and never answers, the control app served
for real. No aiohttp repr, no exception text, no traceback.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import structlog.testing
from click.testing import CliRunner, Result

from agent.cli import EXIT_UNAVAILABLE, main
from agent.net_errors import describe
from agent.peer.client import PeerClient, PeerTimeouts, PeerUnavailable
from agent.peer.health import PeerHealthMonitor
from agent.service.control import MAX_HISTORY, ControlServer
from tests.helpers import run_async

HINT = "(is `ferry run` running?)"


@pytest.fixture
def dead_socket() -> Iterator[Path]:
    """A control socket path where a socket exists but no agent listens (it crashed)."""
    with tempfile.TemporaryDirectory(prefix="fmsg") as d:
        path = Path(d) / "ferry.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
        yield path


def _config(tmp_path: Path, sock: Path) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"name: node-a\nstate_dir: {tmp_path / 'state'}\ncontrol_socket: {sock}\n")
    return cfg


def _ferry(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["status"], id="status"),
        pytest.param(["status", "--json"], id="status-json"),
        pytest.param(["migrate", "web", "--to", "node-b"], id="migrate"),
        pytest.param(["resolve", "m1", "--keep", "target"], id="resolve"),
    ],
)
def test_cli_with_the_agent_down_says_one_line(
    tmp_path: Path, dead_socket: Path, command: list[str]
) -> None:
    result = _ferry(*command, "--config", str(_config(tmp_path, dead_socket)))
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert result.stderr.splitlines() == [
        f"ferry: agent at {dead_socket}: connection refused {HINT}"
    ]
    assert "Traceback" not in result.output and "Error(" not in result.output


def test_drain_with_the_agent_down_names_the_socket(tmp_path: Path, dead_socket: Path) -> None:
    result = _ferry("drain", "--config", str(_config(tmp_path, dead_socket)))
    assert result.exit_code == 0, result.output
    assert f"agent not running (agent at {dead_socket}: connection refused {HINT})" in (
        result.stdout
    )


def test_history_with_the_agent_down_reads_the_journal(tmp_path: Path, dead_socket: Path) -> None:
    result = _ferry("history", "--config", str(_config(tmp_path, dead_socket)))
    assert result.exit_code == 0, result.output
    assert "no migrations yet" in result.stdout


def test_history_limit_is_bounded_in_the_cli(tmp_path: Path, dead_socket: Path) -> None:
    result = _ferry("history", "--limit", "9" * 30, "--config", str(_config(tmp_path, dead_socket)))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"1<=x<={MAX_HISTORY}" in result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_peer_down_is_one_line_with_name_address_and_failure() -> None:
    port = _closed_port()

    async def go() -> str:
        ctx = ssl.create_default_context()
        async with PeerClient("node-b", f"127.0.0.1:{port}", ctx) as client:
            with pytest.raises(PeerUnavailable) as err:
                await client.post_json("/v1/migrations", {})
        return str(err.value)

    assert run_async(go()) == (
        f"peer node-b at 127.0.0.1:{port}: connection refused (POST /v1/migrations)"
    )


def test_silent_peer_times_out_in_one_line() -> None:
    async def go() -> tuple[str, str]:
        accepted: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # accept, then say nothing

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        address = f"127.0.0.1:{port}"
        try:
            timeouts = PeerTimeouts(connect=0.3, request=0.3)
            async with PeerClient("node-c", address, ssl.create_default_context(), timeouts) as c:
                with pytest.raises(PeerUnavailable) as err:
                    await c.health()
        finally:
            for w in accepted:
                w.close()
            server.close()
            await server.wait_closed()
        return str(err.value), address

    message, address = run_async(go())
    assert message == f"peer node-c at {address}: timed out (GET /v1/health)"


def test_status_peer_list_and_log_use_the_same_line() -> None:
    from agent.config import PeerConfig

    port = _closed_port()
    peers = [PeerConfig(name="node-d", address=f"127.0.0.1:{port}")]

    async def go() -> str | None:
        monitor = PeerHealthMonitor.for_peers(peers, ssl.create_default_context(), timeout=2)
        try:
            (health,) = await monitor.poll_once()
            await monitor.poll_once()  # the same failure again is not logged again
        finally:
            await monitor.close()
        return health.error

    with structlog.testing.capture_logs() as logs:
        error = run_async(go())
    line = f"peer node-d at 127.0.0.1:{port}: connection refused (GET /v1/health)"
    assert error == line
    assert [e["error"] for e in logs if e["event"] == "peer.unreachable"] == [line]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset"),
        (TimeoutError(), "timed out"),
        (aiohttp.ServerDisconnectedError(), "the connection closed before an answer"),
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve the host name"),
    ],
)
def test_describe_gives_a_few_words(exc: BaseException, expected: str) -> None:
    try:
        raise RuntimeError("wrapper with a long repr") from exc
    except RuntimeError as outer:
        assert describe(outer).startswith(expected)


# --------------------------------------------------------------- control socket


class _Service:
    def __init__(self) -> None:
        self.limits: list[int] = []

    async def status(self) -> dict[str, Any]:
        raise KeyError("secret internal detail")

    async def drain(self, reason: str) -> dict[str, Any]:
        return {}

    async def undrain(self) -> dict[str, Any]:
        return {}

    async def history(self, limit: int) -> list[dict[str, Any]]:
        self.limits.append(limit)
        return []


@pytest.fixture
def control() -> Iterator[tuple[Path, _Service]]:
    with tempfile.TemporaryDirectory(prefix="fctl") as d:
        yield Path(d) / "ferry.sock", _Service()


async def _get(sock: Path, route: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
        session.get(f"http://ferry{route}") as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    "limit",
    ["abc", "0", "-1", "9" * 40, str(MAX_HISTORY + 1), "\u00b2", "\u0661", "1.5", "", "1e3"],
)
def test_history_bad_limit_is_400_with_one_line(control: tuple[Path, _Service], limit: str) -> None:
    sock, service = control

    async def go() -> tuple[int, Any]:
        server = ControlServer(sock, service)
        await server.start()
        try:
            return await _get(sock, f"/v1/history?limit={limit}")
        finally:
            await server.stop()

    status, body = run_async(go())
    assert status == 400
    assert body["error"].startswith(f"limit must be a whole number from 1 to {MAX_HISTORY}, got ")
    assert "\n" not in body["error"] and len(body["error"]) < 200
    assert service.limits == []


def test_history_good_limit(control: tuple[Path, _Service]) -> None:
    sock, service = control

    async def go() -> tuple[int, Any]:
        server = ControlServer(sock, service)
        await server.start()
        try:
            return await _get(sock, f"/v1/history?limit={MAX_HISTORY}")
        finally:
            await server.stop()

    assert run_async(go()) == (200, {"migrations": []})
    assert service.limits == [MAX_HISTORY]


def test_a_failing_route_answers_500_without_exception_text(
    control: tuple[Path, _Service],
) -> None:
    sock, service = control

    async def go() -> tuple[int, Any]:
        server = ControlServer(sock, service)
        await server.start()
        try:
            return await _get(sock, "/v1/status")
        finally:
            await server.stop()

    status, body = run_async(go())
    assert status == 500
    assert body == {"error": "the agent failed to answer GET /v1/status; see its log"}


def test_start_up_warning_for_a_down_peer_is_the_monitor_line() -> None:
    from agent.model import PeerHealth
    from agent.service.prereqs import check_peers

    line = "peer c at 10.0.0.3:7443: connection refused (GET /v1/health)"

    async def probe() -> list[PeerHealth]:
        return [
            PeerHealth(name="c", reachable=False, error=line),
            PeerHealth(name="d", reachable=False, error=None),
        ]

    c, d = run_async(check_peers(probe))
    assert str(c).startswith(f"warning: peer:c: not usable: {line}; fix: ")
    assert str(d).startswith("warning: peer:d: not usable: peer d: unreachable; fix: ")

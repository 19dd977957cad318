"""`ferry drain/undrain/status/history` against a real control socket (and without an agent)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.cli import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, main
from agent.service.control import ControlServer
from tests.helpers import run_async

STATUS: dict[str, Any] = {
    "host": "node-a",
    "draining": True,
    "drain_reason": "kernel",
    "dry_run": False,
    "signals": {"marker.drain": 1.0, "psi.cpu.some.avg10": 3.25},
    "policies": [
        {"name": "maintenance-drain", "status": "firing", "since_wall": 0, "summary": "x"},
    ],
    "migrations": [{"container": "web", "target": "node-b", "phase": "checkpoint"}],
    "evacuation": {
        "state": "stuck",
        "in_progress": [],
        "stuck": [
            {"container": "db", "reason": "refused: no room", "attempts": 2, "retry_in_s": 60.0}
        ],
        "done": [{"container": "cache"}],
    },
    "peers": [
        {"name": "node-b", "reachable": True, "mem_available_bytes": 2 << 30},
        {"name": "node-c", "reachable": False, "error": "connection refused"},
    ],
}


class FakeAgent:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.undrained = 0

    async def status(self) -> dict[str, Any]:
        return STATUS

    async def drain(self, reason: str) -> dict[str, Any]:
        self.reasons.append(reason)
        return {"draining": True, "message": "drain marker set"}

    async def undrain(self) -> dict[str, Any]:
        self.undrained += 1
        return {"draining": False, "message": "drain marker removed"}

    async def history(self, limit: int) -> list[dict[str, Any]]:
        return [
            {
                "container_name": "web",
                "source": "node-a",
                "target": "node-b",
                "outcome": "succeeded",
                "started": 1.7e9,
                "report": {"downtime_s": 0.31},
            }
        ][:limit]


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fcli") as d:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(
            f"name: node-a\nstate_dir: {tmp_path / 'state'}\ncontrol_socket: {d}/ferry.sock\n"
        )
        yield cfg


def invoke(*args: str) -> Result:
    # Rich wraps tables to the terminal width; give it room so cells stay whole.
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def with_agent(agent: FakeAgent, config: Path, *args: str) -> Result:
    sock = Path(config.read_text().split("control_socket: ")[1].strip())

    async def scenario() -> Result:
        server = ControlServer(sock, agent)
        await server.start()
        try:
            return await asyncio.to_thread(invoke, *args)
        finally:
            await server.stop()

    return run_async(scenario())


def test_drain_and_undrain_through_the_agent(config: Path) -> None:
    agent = FakeAgent()
    r = with_agent(agent, config, "drain", "--reason", "kernel 6.9", "--config", str(config))
    assert r.exit_code == 0, r.output
    assert agent.reasons == ["kernel 6.9"]
    assert "draining node-a" in r.output
    r = with_agent(agent, config, "undrain", "--config", str(config))
    assert r.exit_code == 0 and agent.undrained == 1


def test_drain_without_agent_writes_the_marker_and_says_so(config: Path, tmp_path: Path) -> None:
    r = invoke("drain", "--reason", "disk swap", "--config", str(config))
    assert r.exit_code == 0, r.output
    marker = tmp_path / "state" / "drain"
    assert marker.read_text() == "disk swap\n"
    assert "agent not running" in r.output and str(marker) in r.output
    r = invoke("undrain", "--config", str(config))
    assert r.exit_code == 0 and not marker.exists()
    assert "removed the drain marker" in r.output


def test_status_json_and_human(config: Path) -> None:
    agent = FakeAgent()
    r = with_agent(agent, config, "status", "--json", "--config", str(config))
    assert r.exit_code == 0
    assert json.loads(r.output) == STATUS
    r = with_agent(agent, config, "status", "--config", str(config))
    assert r.exit_code == 0
    for text in (
        "DRAINING",
        "maintenance-drain",
        "firing",
        "refused: no room",
        "in 60s",
        "checkpoint",
        "unreachable",
        "connection refused",
        "2.0GiB",
    ):
        assert text in r.output, text


def test_status_without_agent_exits_3(config: Path) -> None:
    r = invoke("status", "--config", str(config))
    assert r.exit_code == EXIT_UNAVAILABLE
    assert "agent at " in r.output and ": no socket (is `ferry run` running?)" in r.output
    assert "Traceback" not in r.output


def test_history(config: Path) -> None:
    agent = FakeAgent()
    r = with_agent(agent, config, "history", "--json", "--limit", "5", "--config", str(config))
    assert r.exit_code == 0
    assert json.loads(r.output)[0]["outcome"] == "succeeded"
    r = with_agent(agent, config, "history", "--config", str(config))
    assert "0.310s" in r.output and "succeeded" in r.output


def test_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("nmae: x\n")
    r = invoke("status", "--config", str(cfg))
    assert r.exit_code == EXIT_BAD_INPUT
    assert "nmae" in r.output and "unknown key" in r.output


def test_config_from_env(config: Path) -> None:
    r = CliRunner().invoke(main, ["status"], env={"FERRY_CONFIG": str(config)})
    assert r.exit_code == EXIT_UNAVAILABLE


def test_help_documents_exit_codes() -> None:
    for cmd in ("run", "drain", "undrain", "status", "history"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0
        assert "Exit codes" in r.output and "FERRY_CONFIG" in r.output


def test_status_says_how_much_memory_is_still_to_come() -> None:
    from agent.cli.ops_cmds import _pages_left

    mib = 1 << 20
    assert _pages_left({"bytes_done": 612 * mib, "bytes_total": 1024 * mib}) == (
        "412 MiB of 1024 MiB left"
    )
    assert _pages_left({"bytes_done": 5 * mib, "bytes_total": 0}) == "5 MiB in"
    assert _pages_left(None) == "-"

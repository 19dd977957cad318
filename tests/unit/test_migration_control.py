"""POST /v1/migrate on the control socket, and `ferry migrate`'s output and exit codes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from agent.cli import main, migrate_cmds
from agent.migration import MigrationFailed, MigrationRefused, MigrationReport, ProgressEvent
from agent.migration.control_routes import add_migration_routes
from tests.helpers import run_async


class FakeService:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, str]] = []

    async def migrate(
        self, container: str, target: str, progress: Any = None, postcopy: bool = False
    ) -> Any:
        self.calls.append((container, target))
        progress(ProgressEvent("m1", "freeze", "checkpointing"))
        await asyncio.sleep(0)
        progress(ProgressEvent("m1", "transfer", "streaming state", 10, 20))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _report() -> MigrationReport:
    return MigrationReport(
        "m1", "web", "a", "b", outcome="succeeded", downtime_s=0.5, total_s=1.5, bytes_state=42,
        phases={"freeze": 0.2, "transfer": 0.1},
    )  # fmt: skip


async def _serve_and_ask(sock: Path, service: FakeService, body: Any = None) -> Any:
    app = web.Application()
    add_migration_routes(app, service)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    lines: list[dict[str, Any]] = []
    try:
        result = await migrate_cmds.stream_migration(sock, "web", "b", lines.append)
    finally:
        await runner.cleanup()
    return lines, result


def test_progress_lines_then_the_report(tmp_path: Path) -> None:
    service = FakeService(_report())
    lines, result = run_async(_serve_and_ask(tmp_path / "s.sock", service))
    assert service.calls == [("web", "b")]
    assert [x["phase"] for x in lines] == ["freeze", "transfer"]
    assert lines[1]["bytes_done"] == 10 and lines[1]["bytes_total"] == 20
    assert result["ok"] and result["report"]["downtime_s"] == 0.5
    assert result["report"]["bytes_moved"] == 42


def test_failures_carry_kind_reason_and_rollback(tmp_path: Path) -> None:
    failed = MigrationFailed("restore failed on b", rolled_back=True)
    failed.report = _report()
    _, result = run_async(_serve_and_ask(tmp_path / "s.sock", FakeService(failed)))
    assert result["ok"] is False and result["kind"] == "failed"
    assert result["rolled_back"] and result["reason"] == "restore failed on b"
    assert result["report"]["migration_id"] == "m1"

    refused = MigrationRefused("unknown peer 'x'", bad_input=True)
    _, result = run_async(_serve_and_ask(tmp_path / "t.sock", FakeService(refused)))
    assert (result["kind"], result["bad_input"]) == ("refused", True)


def test_bad_request_body_is_400(tmp_path: Path) -> None:
    async def scenario() -> int:
        app = web.Application()
        add_migration_routes(app, FakeService(_report()))
        runner = web.AppRunner(app)
        await runner.setup()
        sock = tmp_path / "s.sock"
        await web.UnixSite(runner, str(sock)).start()
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
                s.post("http://x/v1/migrate", json={"container": ""}) as resp,
            ):
                return resp.status
        finally:
            await runner.cleanup()

    assert run_async(scenario()) == 400


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ferry.yaml"
    path.write_text(f"name: a\nstate_dir: {tmp_path}/state\ncontrol_socket: {tmp_path}/c.sock\n")
    return path


def _cli(monkeypatch: pytest.MonkeyPatch, config: Path, result: Any) -> Any:
    async def fake(
        sock: Path, container: str, target: str, on_line: Any, postcopy: bool = False
    ) -> Any:
        on_line({"type": "progress", "phase": "freeze", "message": "x", "elapsed_s": 0.1})
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(migrate_cmds, "stream_migration", fake)
    return CliRunner().invoke(main, ["migrate", "web", "--to", "b", "--config", str(config)])


def test_cli_exit_codes(monkeypatch: pytest.MonkeyPatch, config: Path) -> None:
    ok = _cli(monkeypatch, config, {"ok": True, "report": _report().to_dict()})
    assert ok.exit_code == 0, ok.output
    assert "downtime" in ok.output and "0.500 s" in ok.output and "now runs on b" in ok.output

    failed = _cli(
        monkeypatch,
        config,
        {"ok": False, "kind": "failed", "reason": "criu said no", "rolled_back": True},
    )
    assert failed.exit_code == 1
    assert "rolled back" in failed.output and "criu said no" in failed.output

    refused = _cli(monkeypatch, config, {"ok": False, "kind": "refused", "reason": "busy"})
    assert refused.exit_code == 1 and "untouched" in refused.output

    bad = _cli(
        monkeypatch,
        config,
        {"ok": False, "kind": "refused", "reason": "unknown peer", "bad_input": True},
    )
    assert bad.exit_code == 2

    away = _cli(monkeypatch, config, migrate_cmds.Unreachable("no agent socket"))
    assert away.exit_code == 3 and "no agent socket" in away.output


def test_cli_bad_config_is_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    result = CliRunner().invoke(main, ["migrate", "web", "--to", "b", "--config", str(bad)])
    assert result.exit_code == 2 and "nonsense_key" in result.output


def test_cli_without_agent_is_3(config: Path) -> None:
    result = CliRunner().invoke(main, ["migrate", "web", "--to", "b", "--config", str(config)])
    assert result.exit_code == 3 and ": no socket (is `ferry run` running?)" in result.output


def test_state_lost_is_said_first_and_is_never_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path
) -> None:
    lost = "STATE LOST: web did not keep its state: left stopped, checkpoint kept at /x"
    failed = MigrationFailed("restore failed on b", rolled_back=True, state_lost=lost)
    failed.report = _report()
    assert not failed.rolled_back and str(failed).endswith(f"({lost})")
    _, result = run_async(_serve_and_ask(tmp_path / "s.sock", FakeService(failed)))
    assert result["state_lost"] == lost and not result["rolled_back"]
    # Moved, but restarted from scratch on the target: not reported as a success.
    report = _report()
    report.state_lost = "STATE LOST: web did not keep its state: on b: Docker restarted it"
    _, moved = run_async(_serve_and_ask(tmp_path / "t.sock", FakeService(report)))
    assert moved["ok"] is False and moved["state_lost"] == report.state_lost
    cli = _cli(monkeypatch, config, result)
    assert cli.exit_code == 1 and f"ferry: {lost}" in cli.output.splitlines()
    assert "rolled back" not in cli.output
    assert _cli(monkeypatch, config, moved).exit_code == 1


def test_metered_migrator_counts_state_lost() -> None:
    from prometheus_client import CollectorRegistry

    from agent.service.metrics import FerryMetrics
    from agent.service.migrations import MeteredMigrator

    metrics = FerryMetrics(CollectorRegistry())
    lost = MigrationFailed("x", rolled_back=False, state_lost="STATE LOST: web ...")
    metered = MeteredMigrator(FakeService(lost), metrics)
    with pytest.raises(MigrationFailed):
        run_async(metered.migrate("web", "b", progress=lambda e: None))
    text = metrics.render().decode()
    assert "ferry_migrations_state_lost_total 1.0" in text
    assert "ferry_migrations_rolled_back_total 0.0" in text


def test_check_cli_prints_every_reason_and_exits_by_the_convention(
    monkeypatch: pytest.MonkeyPatch, config: Path
) -> None:
    from agent.service.control import AgentUnreachable, ControlClient, ControlRequestFailed

    answers: list[Any] = []

    async def request(self: Any, method: str, route: str, body: Any = None) -> Any:
        assert (method, route) == ("POST", "/v1/check")
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(ControlClient, "request", request)
    cannot = {
        "movable": False,
        "permanent": True,
        "container": "web",
        "reasons": ["container web runs with --init: ...", "b: port 80 in use"],
        "changes": ["its address 172.17.0.2 on network bridge changes"],
        "peers": {},
    }
    can = dict(cannot, movable=True, reasons=[], peers={"b": {"accepts": True, "changes": []}})
    answers += [
        {"eligibility": cannot, "pick": None},
        {"eligibility": can, "pick": "b"},
        ControlRequestFailed(400, "no container 'x' on a"),
        AgentUnreachable("no agent socket"),
        {"eligibility": can, "pick": "b"},
    ]
    run = CliRunner().invoke
    out = run(main, ["check", "web", "--config", str(config)])
    assert out.exit_code == 1, out.output
    assert "web cannot move (not until something changes):" in out.output
    assert "  - b: port 80 in use" in out.output and "changes" in out.output
    out = run(main, ["check", "web", "--config", str(config)])
    assert out.exit_code == 0 and "web can move to b" in out.output
    assert run(main, ["check", "x", "--config", str(config)]).exit_code == 2
    assert run(main, ["check", "web", "--config", str(config)]).exit_code == 3
    dry = run(main, ["migrate", "web", "--dry-run", "--config", str(config)])
    assert dry.exit_code == 0 and "web can move to b" in dry.output


class StuckService:
    """A migration that only ends when cancelled (a peer that never answers)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def migrate(
        self, container: str, target: str, progress: Any = None, postcopy: bool = False
    ) -> Any:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_stopping_the_server_cancels_a_migration_in_flight_at_once(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    service = StuckService()

    async def scenario() -> tuple[float, list[dict[str, Any]], Any]:
        app = web.Application()
        add_migration_routes(app, service)
        runner = web.AppRunner(app)  # the default shutdown timeout: 60 s
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        lines: list[dict[str, Any]] = []
        ask = asyncio.ensure_future(migrate_cmds.stream_migration(sock, "web", "b", lines.append))
        await asyncio.wait_for(service.started.wait(), 10)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await runner.cleanup()
        took = loop.time() - began
        result = await asyncio.wait_for(ask, 10)
        return took, lines, result

    took, _, result = run_async(scenario())
    assert service.cancelled
    assert took < 5, f"shutdown waited {took:.1f}s for a migration it should have cancelled"
    assert result["ok"] is False and "agent stopping" in result["reason"]

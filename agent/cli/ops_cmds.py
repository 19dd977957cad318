"""`ferry run`, `ferry drain`, `ferry undrain`, `ferry status`, `ferry history`.

Everything but `run` talks to the running agent over its control socket.
`drain`/`undrain` fall back to the marker file when no agent answers (the
agent reads the marker when it starts); `history` falls back to the journal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, main
from agent.cli.options import config_option, load_config_or_exit
from agent.config import FerryConfig
from agent.peer import protocol
from agent.service.control import (
    MAX_HISTORY,
    AgentUnreachable,
    ControlClient,
    ControlRequestFailed,
)
from agent.service.drain import DrainMarker

T = TypeVar("T")

_EXIT_CODES = """
\b
Exit codes:
  0  ok
  1  the operation ran and failed
  2  bad input (config or arguments); one line per problem on stderr
  3  the agent is unreachable or its prerequisites are missing
"""


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"ferry: {message}", err=True)
    sys.exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- run


@main.command("run", epilog=_EXIT_CODES)
@config_option()
def run_cmd(config_path: Path) -> None:
    """Run the agent in the foreground (what the systemd unit starts).

    Loads the config and policies, checks prerequisites (Docker in experimental
    mode, CRIU >= 4.2, data root, TLS files; unreachable peers are warnings),
    then serves the peer API, the control socket and (if configured) metrics,
    and evaluates policies until SIGTERM or SIGINT. Under systemd it reports
    READY, STATUS and watchdog pings over $NOTIFY_SOCKET.
    """
    from agent.service.runtime import run_agent

    sys.exit(run_agent(config_path))


# ---------------------------------------------------------------------------- drain


@main.command("drain", epilog=_EXIT_CODES)
@click.option("--reason", default="", help="Why; shown in `ferry status` and the log.")
@click.option(
    "--wait",
    is_flag=True,
    help="Block until this host is empty (exit 0) or some containers could not move (exit 1).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="With --wait: give up after this many seconds (exit 1). Default: no limit.",
)
@config_option()
def drain_cmd(reason: str, wait: bool, timeout: float | None, config_path: Path) -> None:
    """Drain this host: evacuate opted-in containers and refuse incoming ones.

    Creates the drain marker through the agent. If no agent is running, the
    marker file is written directly and the agent acts on it when it starts.
    With a `fleet:` section, the host first takes its place in the fleet's drain
    queue: at most fleet.max_draining_hosts hosts evacuate at once, the others
    wait (`ferry status` shows whom they are queued behind) and evacuate in turn.
    """
    cfg = load_config_or_exit(config_path)
    client = ControlClient(cfg.control_socket)
    try:
        result = _run(client.drain(reason))
    except AgentUnreachable as exc:
        if wait:
            _fail(EXIT_UNAVAILABLE, f"{exc}; --wait needs the agent")
        marker = cfg.marker_paths()["drain"]
        try:
            DrainMarker(marker).set(reason)
        except OSError as err:
            _fail(EXIT_FAILED, f"{exc}; and writing {marker} failed: {err}")
        click.echo(f"agent not running ({exc}); wrote the drain marker {marker} directly.")
        click.echo("The agent will evacuate this host when it starts.")
        return
    except ControlRequestFailed as exc:
        _fail(EXIT_FAILED, str(exc))
    click.echo(f"draining {cfg.name}: {result.get('message', 'drain marker set')}")
    if not wait:
        click.echo("Watch progress with `ferry status`.")
        return
    sys.exit(_run(wait_until_drained(client, timeout)))


def drain_outcome(status: dict[str, Any]) -> tuple[str, str | None]:
    """("done" | "stuck" | "waiting", a line to print or None) for one status answer."""
    progress = status.get("drain_progress") or {}
    remaining = list(progress.get("remaining") or [])
    evac = status.get("evacuation") or {}
    moving = evac.get("in_progress") or []
    stuck = evac.get("stuck") or []
    fleet_drain = (status.get("fleet") or {}).get("drain") or {}
    if fleet_drain.get("state") in ("queued", "requested"):
        behind = ", ".join(fleet_drain.get("queued_behind") or []) or "?"
        return "waiting", f"queued behind {behind}"
    if not progress.get("marker"):
        return "waiting", "waiting for the drain to start"
    # A migration still finishing (commit, clean-up) is not done yet, even once the
    # container runs elsewhere: a reboot now would leave it for reconcile to settle.
    in_flight = [m for m in status.get("migrations") or [] if m.get("role", "source") == "source"]
    if not remaining and in_flight:
        return "waiting", f"{len(in_flight)} migration(s) finishing"
    if not remaining:
        return "done", None
    if moving:
        return "waiting", f"{len(moving)} moving, {len(remaining)} left"
    # Every try has run (nothing moving or queued) and something is still here. A
    # container held for its turn (the fleet's drain budget) is not stuck: its reason
    # starts with "waiting".
    final = {
        str(x.get("container")): x
        for x in stuck
        if not str(x.get("reason") or "").startswith("waiting")
    }
    if evac.get("state") in ("stuck", "done") and len(final) == len(stuck):
        unselected = {"reason": "not selected by any policy"}
        lines = [f"  {name}: {final.get(name, unselected).get('reason')}" for name in remaining]
        return "stuck", "\n".join(lines)
    return "waiting", f"{len(remaining)} left"


async def wait_until_drained(client: ControlClient, timeout: float | None) -> int:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    last = None
    while True:
        try:
            status = await client.status()
        except (AgentUnreachable, ControlRequestFailed) as exc:
            click.echo(f"ferry: {exc}", err=True)
            return EXIT_UNAVAILABLE
        outcome, line = drain_outcome(status)
        if outcome == "done":
            click.echo(f"{status.get('host')}: drained, no opted-in container left running here")
            return EXIT_OK
        if outcome == "stuck":
            click.echo(f"{status.get('host')}: these containers could not move:", err=True)
            click.echo(line or "", err=True)
            return EXIT_FAILED
        if line != last:
            click.echo(line)
            last = line
        if deadline is not None and loop.time() > deadline:
            click.echo(f"ferry: still not drained after {timeout:.0f}s: {line}", err=True)
            return EXIT_FAILED
        await asyncio.sleep(1.0)


@main.command("undrain", epilog=_EXIT_CODES)
@config_option()
def undrain_cmd(config_path: Path) -> None:
    """End a drain: remove the drain marker and accept incoming migrations again.

    Containers already moved away are not moved back.
    """
    cfg = load_config_or_exit(config_path)
    try:
        result = _run(ControlClient(cfg.control_socket).undrain())
    except AgentUnreachable as exc:
        marker = cfg.marker_paths()["drain"]
        try:
            DrainMarker(marker).clear()
        except OSError as err:
            _fail(EXIT_FAILED, f"{exc}; and removing {marker} failed: {err}")
        click.echo(f"agent not running ({exc}); removed the drain marker {marker} directly.")
        return
    except ControlRequestFailed as exc:
        _fail(EXIT_FAILED, str(exc))
    click.echo(f"{cfg.name}: {result.get('message', 'drain marker removed')}")


# ---------------------------------------------------------------------------- status


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(time.time() - float(ts), 0)
    if secs < 90:
        return f"{secs:.0f}s ago"
    if secs < 5400:
        return f"{secs / 60:.0f}m ago"
    return f"{secs / 3600:.1f}h ago"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _bytes(value: Any) -> str:
    n = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(value)


def render_status(status: dict[str, Any], console: Console) -> None:
    """Human view of /v1/status: one table per concern."""
    host = status.get("host", "?")
    mode = []
    if status.get("draining"):
        why = status.get("drain_reason")
        mode.append(f"[bold yellow]DRAINING[/]{f' ({why})' if why else ''}")
    if status.get("dry_run"):
        mode.append("[cyan]dry run[/]")
    console.print(f"[bold]{host}[/] {' '.join(mode) or '[green]accepting[/]'}")
    fleet_drain = (status.get("fleet") or {}).get("drain") or {}
    if fleet_drain.get("state") == "queued":
        behind = ", ".join(fleet_drain.get("queued_behind") or []) or "?"
        console.print(
            f"[bold yellow]QUEUED[/] to drain: queued behind {behind} "
            f"(fleet.max_draining_hosts={fleet_drain.get('max_draining_hosts')}); "
            "refusing incoming containers"
        )
    if status.get("status_line"):
        console.print(status["status_line"])

    signals = status.get("signals") or {}
    t = Table(title="Signals", title_justify="left")
    t.add_column("signal")
    t.add_column("value", justify="right")
    for name, value in sorted(signals.items()):
        t.add_row(name, _bytes(value) if name.endswith("_bytes") else _num(value))
    console.print(t)

    t = Table(title="Policies", title_justify="left")
    for col in ("policy", "state", "since", "action", "last result"):
        t.add_column(col)
    styles = {"firing": "red", "pending": "yellow", "cooling_down": "cyan", "ok": "green"}
    for p in status.get("policies") or []:
        state = str(p.get("status", "?"))
        t.add_row(
            str(p.get("name")),
            f"[{styles.get(state, 'white')}]{state}[/]",
            _ago(p.get("since_wall")),
            str(p.get("summary", "")),
            str(p.get("last_result") or "-"),
        )
    console.print(t)

    for m in status.get("in_doubt") or []:
        console.print(
            f"[bold red]IN DOUBT[/] {m.get('container')} -> {m.get('target')} "
            f"(migration {m.get('id')}): runs nowhere, state kept. {m.get('reason') or ''}\n"
            f"  resolve: {m.get('resolve')}"
        )
    migrations = status.get("migrations") or []
    evac = status.get("evacuation") or {}
    moving = migrations or evac.get("in_progress") or []
    if moving:
        t = Table(title="Migrations in flight", title_justify="left")
        for col in ("container", "target", "phase", "started", "pages"):
            t.add_column(col)
        for m in moving:
            t.add_row(
                str(m.get("container")),
                str(m.get("target") or "-"),
                str(m.get("phase") or m.get("state") or "-"),
                _ago(m.get("started_at")),
                _pages_left(m.get("pages")),
            )
        console.print(t)
    stuck = evac.get("stuck") or []
    if stuck:
        t = Table(title="Could not move (still running here)", title_justify="left")
        for col in ("container", "why", "attempts", "next retry"):
            t.add_column(col)
        for s in stuck:
            retry = s.get("retry_in_s")
            t.add_row(
                str(s.get("container")),
                str(s.get("reason")),
                str(s.get("attempts", 0)),
                "not retried" if retry is None else f"in {retry:.0f}s",
            )
        console.print(t)
    cannot = {c["container"]: c for c in evac.get("cannot_move") or []}
    for u in status.get("unmovable") or []:
        cannot.setdefault(u["container"], u)
    if cannot:
        t = Table(title="Opted in, but not moving", title_justify="left")
        for col in ("container", "why"):
            t.add_column(col)
        for name, c in sorted(cannot.items()):
            why = str(c.get("reason") or "")
            if c.get("state") == "left_behind":
                why = f"left behind: {why}"
            elif not why.startswith("cannot move"):
                why = f"cannot move: {why}"
            t.add_row(name, why)
        console.print(t)
    if evac.get("state") not in (None, "idle"):
        done = len(evac.get("done") or [])
        console.print(
            f"Evacuation: {evac.get('state')}: {done} moved, "
            f"{len(evac.get('in_progress') or [])} moving, {len(stuck)} stuck"
        )

    t = Table(title="Peers", title_justify="left")
    for col in ("peer", "health", "load1", "cpu", "mem free", "containers", "error"):
        t.add_column(col)
    for peer in status.get("peers") or []:
        t.add_row(
            str(peer.get("name")),
            _peer_health(peer),
            _num(peer.get("load1", 0.0)),
            _num(peer.get("cpu_pressure", 0.0)),
            _bytes(peer.get("mem_available_bytes", 0)),
            str(peer.get("running_containers", 0)),
            str(peer.get("error") or ""),
        )
    console.print(t)


def _peer_health(peer: dict[str, Any]) -> str:
    if not peer.get("reachable"):
        return "[red]unreachable[/]"
    # Lasting until one side is upgraded, so it is shown before passing states.
    mismatch = protocol.mismatch(
        int(peer.get("protocol") or 1), int(peer.get("protocol_oldest") or 1)
    )
    if mismatch:
        return f"[red]{mismatch}[/]"
    if peer.get("draining"):
        return "[yellow]draining[/]"
    if peer.get("overloaded"):
        return "[yellow]overloaded[/]"
    return "[green]ok[/]"


MIB = 1 << 20


def _pages_left(pages: Any) -> str:
    """'412 MiB of 1024 MiB left' for a move still bringing memory pages in."""
    if not isinstance(pages, dict):
        return "-"
    done, total = int(pages.get("bytes_done") or 0), int(pages.get("bytes_total") or 0)
    if not total:
        return f"{done / MIB:.0f} MiB in"
    return f"{max(total - done, 0) / MIB:.0f} MiB of {total / MIB:.0f} MiB left"


@main.command("status", epilog=_EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@config_option()
def status_cmd(as_json: bool, config_path: Path) -> None:
    """This host's signals, policy states, migrations in flight, stuck evacuees and peers."""
    cfg = load_config_or_exit(config_path)
    try:
        status = _run(ControlClient(cfg.control_socket).status())
    except AgentUnreachable as exc:
        _fail(EXIT_UNAVAILABLE, str(exc))
    except ControlRequestFailed as exc:
        _fail(EXIT_FAILED, str(exc))
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
    else:
        render_status(status, Console())
    if status.get("in_doubt"):
        sys.exit(EXIT_FAILED)  # loud for scripts and monitoring: something needs an operator


# ---------------------------------------------------------------------------- history


def _history_from_journal(cfg: FerryConfig, limit: int) -> list[dict[str, Any]]:
    from agent.journal import Journal

    if not cfg.state_dir.is_dir():
        return []
    journal = Journal(cfg.state_dir)
    try:
        return [_record_dict(r) for r in journal.history(limit)]
    finally:
        journal.close()


def _record_dict(record: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(record) and not isinstance(record, type):
        return asdict(record)
    return dict(record)


def _when(ts: Any) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def render_history(items: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="Migrations", title_justify="left")
    for col in ("started", "container", "from", "to", "outcome", "downtime", "moved", "reason"):
        t.add_column(col)
    for m in items:
        report = m.get("report") or {}
        downtime = report.get("downtime_s")  # the journal keeps MigrationReport.to_dict()
        outcome = m.get("outcome") or f"running ({m.get('phase', '?')})"
        if report.get("state_lost"):
            outcome = f"{outcome}, STATE LOST"
        t.add_row(
            _when(m.get("started")),
            str(m.get("container_name") or m.get("container")),
            str(m.get("source", "-")),
            str(m.get("target", "-")),
            str(outcome),
            f"{float(downtime):.3f}s" if isinstance(downtime, int | float) else "-",
            _bytes(report["bytes_moved"]) if "bytes_moved" in report else "-",
            str(report.get("state_lost") or m.get("reason") or ""),
        )
    console.print(t)


@main.command("history", epilog=_EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="Print the records with full reports.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, MAX_HISTORY))
@config_option()
def history_cmd(as_json: bool, limit: int, config_path: Path) -> None:
    """Past migrations (newest first) with their outcome and report.

    Reads from the agent, or straight from the journal in state_dir when the
    agent is not running.
    """
    cfg = load_config_or_exit(config_path)
    try:
        items = _run(ControlClient(cfg.control_socket).history(limit))
    except AgentUnreachable as exc:
        try:
            items = _history_from_journal(cfg, limit)
        except Exception as err:  # any journal problem: report both causes
            _fail(EXIT_UNAVAILABLE, f"{exc}; and reading the journal failed: {err}")
        click.echo(f"(agent not running; read from the journal in {cfg.state_dir})", err=True)
    except ControlRequestFailed as exc:
        _fail(EXIT_FAILED, str(exc))
    if as_json:
        click.echo(json.dumps(items, indent=2, sort_keys=True, default=str))
        return
    if not items:
        click.echo("no migrations yet")
        return
    render_history(items, Console())


__all__ = ["EXIT_OK", "render_history", "render_status"]

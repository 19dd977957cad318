"""`ferry fleet status [--json]`: every host of the fleet, as this host's agent sees it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent.cli import EXIT_FAILED, EXIT_UNAVAILABLE, main
from agent.cli.ops_cmds import _EXIT_CODES, _bytes
from agent.cli.options import config_option, load_config_or_exit
from agent.service.control import AgentUnreachable, ControlClient, ControlRequestFailed


@main.group("fleet")
def fleet_group() -> None:
    """The fleet coordinated through etcd (config section `fleet:`)."""


def render_fleet(fleet: dict[str, Any], console: Console) -> None:
    fresh = "[green]current[/]" if fleet.get("fresh") else f"[red]STALE[/] {fleet.get('error')}"
    queue = ", ".join(fleet.get("drain_queue") or []) or "empty"
    console.print(
        f"fleet seen from [bold]{fleet.get('self')}[/]: {fresh}; "
        f"drain queue: {queue} (max_draining_hosts={fleet.get('max_draining_hosts')})"
    )
    t = Table(title="Hosts", title_justify="left")
    for col in ("host", "state", "drain", "mem free", "reserved", "disk free", "containers",
                "in flight", "labels"):  # fmt: skip
        t.add_column(col)
    for h in fleet.get("hosts") or []:
        t.add_row(
            str(h.get("name")),
            "[green]up[/]" if h.get("up") else "[red]down (lease expired)[/]",
            str(h.get("drain")),
            _bytes(h.get("mem_available_bytes") or 0),
            f"{_bytes(h.get('reserved_memory_bytes') or 0)} mem, "
            f"{_bytes(h.get('reserved_disk_bytes') or 0)} disk",
            _bytes(h.get("disk_free_bytes") or 0),
            str(h.get("running_containers") if h.get("running_containers") is not None else "-"),
            str(h.get("in_flight") or 0),
            ",".join(f"{k}={v}" for k, v in sorted((h.get("labels") or {}).items())),
        )
    console.print(t)


@fleet_group.command("status", epilog=_EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="Print the fleet view as JSON.")
@config_option()
def fleet_status_cmd(as_json: bool, config_path: Path) -> None:
    """Every host: up/down, draining/queued, capacity and reservations, containers, in flight."""
    cfg = load_config_or_exit(config_path)
    if cfg.fleet is None:
        click.echo(
            f"ferry: {config_path}: no fleet: section; this host uses static peers", err=True
        )
        sys.exit(EXIT_FAILED)
    try:
        status = asyncio.run(ControlClient(cfg.control_socket).status())
    except AgentUnreachable as exc:
        click.echo(f"ferry: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except ControlRequestFailed as exc:
        click.echo(f"ferry: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    fleet = status.get("fleet") or {}
    if as_json:
        click.echo(json.dumps(fleet, indent=2, sort_keys=True))
    else:
        render_fleet(fleet, Console())
    if not fleet.get("fresh"):
        sys.exit(EXIT_FAILED)  # a stale view is worth a non-zero exit to scripts

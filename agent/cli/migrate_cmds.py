"""`ferry migrate CONTAINER [--to PEER]`: ask the local agent to move a container, and watch."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from agent.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, check_cmds, main
from agent.cli.options import config_option, load_config_or_exit
from agent.errors import one_line
from agent.service.control import AgentUnreachable, ControlClient

MIGRATE_ROUTE = "/v1/migrate"

_EPILOG = """
\b
Exit codes:
  0  the container runs on the target (--dry-run: it could move)
  1  refused, failed, in doubt, or its state was lost; the reason is printed
     (rolled back: it runs here again with its state; in doubt: it runs nowhere
     until `ferry resolve`; state lost: it was, or must be, started from scratch)
  2  bad input (config, unknown container or peer)
  3  the local agent is unreachable
"""


# The name the command's callers and tests know; it is the control client's error.
Unreachable = AgentUnreachable


async def stream_migration(
    socket_path: Path,
    container: str,
    target: str | None,
    on_line: Callable[[dict[str, Any]], None],
    postcopy: bool = False,
) -> dict[str, Any]:
    """POST /v1/migrate on the control socket; feed progress lines; return the result line."""
    # No total timeout: a big container takes minutes. The agent reports as it goes.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    result: dict[str, Any] | None = None
    body: dict[str, Any] = {"container": container} | ({"target": target} if target else {})
    if postcopy:
        body["postcopy"] = True
    async with ControlClient(socket_path).open("POST", MIGRATE_ROUTE, body, timeout) as resp:
        if resp.status == 404:
            raise Unreachable("the agent has no migration engine (no /v1/migrate route)")
        if resp.status >= 400:
            text = await resp.text(errors="replace")
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            error = answer.get("error") if isinstance(answer, dict) else None
            msg = one_line(str(error) if error else text[:300] or f"HTTP {resp.status}")
            return {
                "type": "result",
                "ok": False,
                "kind": "refused",
                "reason": msg,
                "bad_input": resp.status == 400,
            }
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue  # not ours to show; the result line decides
            if not isinstance(item, dict):
                continue
            if item.get("type") == "result":
                result = item
            else:
                on_line(item)
    if result is None:
        raise Unreachable("the agent closed the stream without a result (did it stop?)")
    return result


def _size(n: Any) -> str:
    v = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def render_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"migration {report.get('migration_id')}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row(
        "container", f"{report.get('container')}: {report.get('source')} -> {report.get('target')}"
    )
    table.add_row("outcome", str(report.get("outcome")))
    if report.get("reason"):
        table.add_row("reason", str(report["reason"]))
    if report.get("downtime_s") is not None:
        table.add_row("downtime", f"{report['downtime_s']:.3f} s")
    table.add_row("total", f"{float(report.get('total_s') or 0):.3f} s")
    table.add_row(
        "bytes moved",
        f"{_size(report.get('bytes_moved'))} (state {_size(report.get('bytes_state'))}"
        f" from {_size(report.get('bytes_state_raw'))}, image {_size(report.get('bytes_image'))})",
    )
    for phase, secs in (report.get("phases") or {}).items():
        table.add_row(f"  {phase}", f"{float(secs):.3f} s")
    console.print(table)


@main.command("migrate", epilog=_EPILOG)
@click.argument("container")
@click.option(
    "--to",
    "target",
    default=None,
    help="Peer to move the container to (default: placement picks one that accepts it).",
)
@config_option("Agent config file (env FERRY_CONFIG); gives the control socket.")
@click.option("--json", "as_json", is_flag=True, help="Print progress and result as JSON lines.")
@click.option(
    "--dry-run", is_flag=True, help="Only check (as `ferry check`): move and freeze nothing."
)
@click.option(
    "--postcopy",
    is_flag=True,
    help="Post-copy: run on the target at once and pull memory behind it (see README).",
)
def migrate_cmd(
    container: str,
    target: str | None,
    config_path: Path,
    as_json: bool,
    dry_run: bool,
    postcopy: bool,
) -> None:
    """Live-migrate CONTAINER to peer --to (or the peer placement picks) through the local agent.

    The container keeps its memory, open files and writable layer. It is
    checked first, as `ferry check` does: a container that cannot move is
    refused before anything is frozen. If anything fails after it is frozen,
    it is restored here and the reason is printed.
    """
    if dry_run:
        check_cmds.finish(check_cmds.run_check(config_path, container, target), target, as_json)
    cfg = load_config_or_exit(config_path)
    console = Console(stderr=False)
    progress = Progress(
        TextColumn("[bold]{task.fields[phase]:<9}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=as_json or not console.is_terminal,
    )
    task: TaskID = progress.add_task(
        f"{container} -> {target or 'a peer'}", total=None, phase="start"
    )

    def on_line(item: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(item))
            return
        total = item.get("bytes_total")
        progress.update(
            task,
            phase=item.get("phase", ""),
            description=item.get("message", ""),
            completed=item.get("bytes_done") or 0,
            total=total if total else None,
        )
        if not console.is_terminal:
            click.echo(
                f"[{item.get('elapsed_s', 0):7.2f}s] {item.get('phase')}: {item.get('message')}"
            )

    try:
        with progress:
            result = asyncio.run(
                stream_migration(cfg.control_socket, container, target, on_line, postcopy)
            )
    except Unreachable as exc:
        click.echo(f"ferry: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    if as_json:
        click.echo(json.dumps(result))
    elif result.get("report"):
        render_report(result["report"], console)
    report = result.get("report") or {}
    if result.get("ok"):
        if not as_json:
            console.print(f"[green]{container} now runs on {report.get('target', target)}[/green]")
        sys.exit(EXIT_OK)
    if result.get("state_lost"):
        # Never "rolled back" or "moved" then: say the one thing that matters first.
        click.echo(f"ferry: {result['state_lost']}", err=True)
        if result.get("reason"):
            click.echo(f"  migration failed: {result['reason']}", err=True)
        sys.exit(EXIT_FAILED)
    why = result.get("reason", "unknown")
    if result.get("bad_input"):
        click.echo(f"ferry: {why}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if result.get("in_doubt"):
        mid = (result.get("report") or {}).get("migration_id", "MIGRATION")
        click.echo(
            f"ferry: migration IN DOUBT: {why}\n"
            f"  {container} runs nowhere until this is resolved; every byte of its state is kept.\n"
            f"  Ferry resolves it by itself once {target} answers; or decide with\n"
            f"  `ferry resolve {mid} --keep target` (if {target} runs it) or "
            f"`--keep source` (if {target} is gone).",
            err=True,
        )
    elif result.get("kind") == "failed":
        state = (
            "rolled back; it runs here again" if result.get("rolled_back") else "NOT rolled back"
        )
        click.echo(f"ferry: migration failed ({state}): {why}", err=True)
    else:
        click.echo(f"ferry: migration refused, {container} untouched: {why}", err=True)
    sys.exit(EXIT_FAILED)


async def _post_resolve(socket_path: Path, migration_id: str, keep: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=5)
    body = {"migration": migration_id, "keep": keep}
    async with ControlClient(socket_path).open("POST", "/v1/resolve", body, timeout) as resp:
        text = await resp.text(errors="replace")
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, {"reason": one_line(text[:300]) or f"HTTP {resp.status}"}


@main.command("resolve")
@click.argument("migration")
@click.option(
    "--keep",
    type=click.Choice(["source", "target"]),
    required=True,
    help="Whose copy is the container from now on.",
)
@config_option("Agent config file (env FERRY_CONFIG); gives the control socket.")
def resolve_cmd(migration: str, keep: str, config_path: Path) -> None:
    """End an in-doubt MIGRATION (run on its source host).

    --keep target: the target runs it; the source's stopped copy and its
    checkpoint are removed. --keep source: the source restores its copy from
    the checkpoint and tells the target to drop its held copy. Use --keep source
    only when the target host is gone or you know its copy is not running:
    otherwise two copies would run.
    """
    cfg = load_config_or_exit(config_path)
    try:
        status, body = asyncio.run(_post_resolve(cfg.control_socket, migration, keep))
    except Unreachable as exc:
        click.echo(f"ferry: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    if isinstance(body, dict) and body.get("ok"):
        click.echo(str(body.get("result")))
        sys.exit(EXIT_OK)
    reason = body.get("reason") or body.get("error") if isinstance(body, dict) else None
    reason = one_line(str(reason or body))
    click.echo(f"ferry: cannot resolve {migration}: {reason}", err=True)
    sys.exit(EXIT_BAD_INPUT if status == 400 else EXIT_FAILED)

"""`ferry check CONTAINER [--to PEER]`: could it move now, and what would change. Moves nothing."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from agent.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, main
from agent.cli.options import config_option, load_config_or_exit
from agent.service.control import AgentUnreachable, ControlClient, ControlRequestFailed

CHECK_ROUTE = "/v1/check"

EPILOG = """
\b
Exit codes:
  0  it can move (to PEER, or to at least one peer)
  1  it cannot move; every reason is printed
  2  bad input (config, unknown container or peer)
  3  the local agent is unreachable
"""


def run_check(config_path: Path, container: str, target: str | None) -> dict[str, Any]:
    """The agent's answer to POST /v1/check, or exit 2 / 3 with one line."""
    cfg = load_config_or_exit(config_path)
    body: dict[str, Any] = {"container": container}
    if target is not None:
        body["target"] = target
    try:
        answer = asyncio.run(
            ControlClient(cfg.control_socket, timeout=60).request("POST", CHECK_ROUTE, body)
        )
    except AgentUnreachable as exc:
        _exit(EXIT_UNAVAILABLE, str(exc))
    except ControlRequestFailed as exc:
        _exit(EXIT_BAD_INPUT if exc.status in (400, 404) else EXIT_FAILED, str(exc))
    if not isinstance(answer, dict) or not isinstance(answer.get("eligibility"), dict):
        _exit(EXIT_UNAVAILABLE, "the agent gave no eligibility answer (is it older than this CLI?)")
    return answer


def _exit(code: int, message: str) -> NoReturn:
    click.echo(f"ferry: {message}", err=True)
    sys.exit(code)


def render(answer: dict[str, Any], target: str | None) -> None:
    e = answer["eligibility"]
    name = e.get("container")
    pick = answer.get("pick")
    if e.get("movable"):
        where = target or pick or ", ".join(p for p, v in e["peers"].items() if v.get("accepts"))
        click.echo(f"{name} can move to {where}")
    else:
        how = "not until something changes" if e.get("permanent") else "not now"
        click.echo(f"{name} cannot move ({how}):")
        for reason in e.get("reasons") or []:
            click.echo(f"  - {reason}")
    peers = e.get("peers") or {}
    if e.get("movable") and target is None:
        for peer, v in sorted(peers.items()):
            if not v.get("accepts"):
                click.echo(f"  {peer} would not take it: {'; '.join(v.get('reasons') or [])}")
    shown = target or pick
    changes = list(e.get("changes") or [])
    if shown in peers:
        changes += peers[shown].get("changes") or []
    if changes:
        click.echo("what changes if it moves:")
        for change in changes:
            click.echo(f"  - {change}")


def finish(answer: dict[str, Any], target: str | None, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    else:
        render(answer, target)
    sys.exit(EXIT_OK if answer["eligibility"].get("movable") else EXIT_FAILED)


@main.command("check", epilog=EPILOG)
@click.argument("container")
@click.option("--to", "target", default=None, help="Ask this peer only (default: every peer).")
@config_option("Agent config file (env FERRY_CONFIG); gives the control socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
def check_cmd(container: str, target: str | None, config_path: Path, as_json: bool) -> None:
    """Say whether CONTAINER can move now, every reason it cannot, and what would change.

    The same check `ferry migrate`, policies and drain run before any freeze:
    this host's reasons (e.g. --init, --link, host devices) and each target's
    (a port or static address it cannot give, a name or network clash, room,
    draining). Nothing is frozen or reserved.
    """
    finish(run_check(config_path, container, target), target, as_json)

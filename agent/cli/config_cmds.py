"""`ferry check-config`, `ferry check-policies`, `ferry test-policy`: check input before it runs.

Every problem is printed on stderr as one line naming file and key, and the
command exits 2; nothing here ever shows a traceback for bad input.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from agent.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from agent.config import FerryConfig, load_config
from agent.errors import InputError
from agent.plugin_loader import Plugins, plugins_for_checks
from agent.policy.actions import needs_target
from agent.policy.loader import load_policies, policy_files
from agent.policy.models import Policy
from agent.policy.timeline import describe_transition, load_timeline, run_timeline

_EXIT_CODES = """
\b
Exit codes:
  0  everything is valid
  2  bad input; one line per problem on stderr: FILE: KEY: REASON
"""


_PLUGIN_HINT = (
    "note: plugin signals and actions are known only with the config that names them "
    "(--config PATH)"
)

# Read a config only to learn its plugins (signals and actions policies may use).
_plugins_config = click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent config whose signals.plugins and actions.plugins the policies may use.",
)


def _bad_input(exc: InputError, hint: str | None = None) -> NoReturn:
    for line in exc.lines():
        click.echo(line, err=True)
    if hint and any("unknown signal" in ln or "unknown action" in ln for ln in exc.lines()):
        click.echo(hint, err=True)
    sys.exit(EXIT_BAD_INPUT)


def _plugins(config_path: Path | None) -> Plugins:
    """The config's plugins, built as `ferry run` builds them; none without a config."""
    if config_path is None:
        return Plugins()
    return plugins_for_checks(load_config(config_path), str(config_path))


def _policies_for(cfg: FerryConfig, config_path: str, plugins: Plugins) -> list[Policy]:
    if not cfg.policies_dir.is_dir():
        raise InputError.single(
            config_path, "policies_dir", f"{cfg.policies_dir} is not a directory"
        )
    return load_policies(
        cfg.policies_dir,
        known_signals=plugins.signal_patterns(),
        known_markers=set(cfg.marker_paths()),
        known_peers={p.name for p in cfg.peers},
        known_actions=plugins.action_names(),
    )


def _print_policies(policies: list[Policy]) -> None:
    width = max((len(p.name) for p in policies), default=0)
    for p in policies:
        click.echo(f"  {p.name:<{width}}  {p.summary()}")


@main.command("check-config", epilog=_EXIT_CODES)
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate the config file PATH and every policy in its policies_dir.

    FERRY__SECTION__KEY environment overrides are applied, as `ferry run`
    would. Prints a short summary: this host, its peers, and each policy with
    its trigger and action.
    """
    try:
        cfg = load_config(path)
        plugins = plugins_for_checks(cfg, str(path))
        policies = _policies_for(cfg, str(path), plugins)
    except InputError as exc:
        _bad_input(exc)
    mode = ", DRY RUN (no action will execute)" if cfg.dry_run else ""
    click.echo(f"ok: {path}")
    click.echo(f"host:     {cfg.name} (peer API on {cfg.listen}){mode}")
    peers = ", ".join(f"{p.name} {p.address}" for p in cfg.peers) or "none"
    click.echo(f"peers:    {peers}")
    markers = ", ".join(f"{n}={p}" for n, p in cfg.marker_paths().items())
    click.echo(f"markers:  {markers}")
    for name, declared in plugins.declared.items():
        click.echo(f"signal plugin {name}: publishes {', '.join(declared)}")
    for action in plugins.actions:
        click.echo(f"action plugin {action.name}: {type(action).__module__}")
    click.echo(f"policies: {len(policies)} in {cfg.policies_dir}")
    _print_policies(policies)


@main.command("check-policies", epilog=_EXIT_CODES)
@click.argument("directory", type=click.Path(path_type=Path))
@_plugins_config
def check_policies(directory: Path, config_path: Path | None) -> None:
    """Validate every policy file (*.yaml, *.yml) in DIRECTORY (or one file).

    Signal names, durations and every key are checked; marker and peer names
    are checked by `ferry check-config`, which knows the config. With --config,
    the signals and actions of the plugins it configures are known too.
    """
    try:
        if directory.is_dir() and not policy_files(directory):
            raise InputError.single(str(directory), "", "no policy files (*.yaml, *.yml) here")
        plugins = _plugins(config_path)
        policies = load_policies(
            directory,
            known_signals=plugins.signal_patterns(),
            known_actions=plugins.action_names(),
        )
    except InputError as exc:
        _bad_input(exc, None if config_path else _PLUGIN_HINT)
    click.echo(f"ok: {len(policies)} policies in {directory}")
    _print_policies(policies)


@main.command(
    "test-policy",
    epilog="""
\b
Exit codes:
  0  the timeline ran and every `expect:` entry held
  1  an `expect:` entry did not hold (each is listed)
  2  bad input: the timeline or a policy is invalid
""",
)
@click.argument("timeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policies",
    "policies_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory (or file) of policies to run.",
)
@click.option("--policy", "only", multiple=True, help="Run only this policy (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print transitions as JSON lines.")
@_plugins_config
def test_policy(
    timeline: Path,
    policies_path: Path,
    only: tuple[str, ...],
    as_json: bool,
    config_path: Path | None,
) -> None:
    """Replay TIMELINE (YAML or JSON) through the policies on a simulated clock.

    Prints every transition: pending, firing, cleared, skipped (with the
    reason: dry_run, cooldown, rate_cap, no_target, no_containers), and for
    would-be actions which containers would go to which peer. Actions never
    run: everything is a dry run. See policies/tests/ for an example timeline
    and agent/policy/timeline.py for the format.
    """
    try:
        tl = load_timeline(timeline)
        plugins = _plugins(config_path)
        policies = load_policies(
            policies_path,
            known_signals=plugins.signal_patterns(),
            known_actions=plugins.action_names(),
        )
        if only:
            unknown = sorted(set(only) - {p.name for p in policies})
            if unknown:
                raise InputError.single("--policy", "", f"no such policy: {', '.join(unknown)}")
            policies = [p for p in policies if p.name in only]
    except InputError as exc:
        _bad_input(exc, None if config_path else _PLUGIN_HINT)
    targets = {a.name: needs_target(a) for a in plugins.actions}
    result = asyncio.run(run_timeline(tl, policies, needs_target=targets))
    for t in result.transitions:
        if as_json:
            click.echo(json.dumps({"at": t.at, **t.to_dict()}))
        else:
            click.echo(describe_transition(t))
    if tl.expect:
        held = len(tl.expect) - len(result.failures)
        click.echo(f"expectations: {held}/{len(tl.expect)} held", err=as_json)
    for failure in result.failures:
        click.echo(f"FAILED {timeline}: {failure}", err=True)
    sys.exit(EXIT_FAILED if result.failures else EXIT_OK)

"""Plugins as the agent and the checks load them: entry points -> config -> sources and actions.

Every test goes through `load_plugins` (what `ferry run` and `ferry check-config`
call) or the CLI itself, with the `ferry.signals` / `ferry.actions` entry points
replaced by ones naming classes in this module.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from pydantic import BaseModel, ConfigDict, Field

from agent.cli import EXIT_BAD_INPUT, main
from agent.config import load_config
from agent.errors import InputError
from agent.model import ActionResult, Decision, Sample, SignalSink, SystemClock
from agent.plugin_loader import Plugins, load_plugins, plugins_for_checks
from agent.policy.actions import (
    ActionContext,
    NoMigrations,
    default_action_factories,
)
from agent.signals.registry import SourceContext, default_registry
from tests.helpers import run_async

HERE = __name__


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    interval: float = Field(default=5.0, gt=0)
    extra_signal: str | None = None  # lets a test declare a clashing name


class ProbeSource:
    """A plugin source as a third party writes it."""

    Params = ProbeParams

    def __init__(self, ctx: SourceContext, params: ProbeParams) -> None:
        self.ctx = ctx
        self.params = params
        self.name = f"probe.{ctx.name}"

    def publishes(self) -> Sequence[str]:
        names = [f"probe.{self.ctx.name}.up"]
        if self.params.extra_signal:
            names.append(self.params.extra_signal)
        return names

    def max_ages(self) -> dict[str, float | None]:
        return {f"probe.{self.ctx.name}.": 3 * self.params.interval}

    async def run(self, sink: SignalSink) -> None:
        sink.publish(Sample(f"probe.{self.ctx.name}.up", 1.0, 0.0))
        sink.publish(Sample("load.1", 99.0, 0.0))  # not declared: must be dropped


class LooseParams(BaseModel):  # extra keys allowed: a typo would vanish
    url: str = ""


class LooseSource(ProbeSource):
    Params = LooseParams  # type: ignore[assignment]


class NotASource:
    Params = ProbeParams

    def __init__(self, ctx: SourceContext, params: ProbeParams) -> None:
        pass


class HookParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    argv: list[str] = Field(min_length=1)


class HookAction:
    Params = HookParams
    needs_target = True

    def __init__(self, ctx: ActionContext, params: HookParams) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.argv = params.argv

    async def execute(self, decision: Decision) -> ActionResult:
        return await self.ctx.migrations.evacuate(decision)


class WrongNameAction(HookAction):
    def __init__(self, ctx: ActionContext, params: HookParams) -> None:
        super().__init__(ctx, params)
        self.name = "something-else"


def entry_points(monkeypatch: pytest.MonkeyPatch, **groups: dict[str, str]) -> None:
    """Replace the installed entry points: {"ferry.signals": {"probe": "mod:obj"}}."""
    eps = [
        importlib.metadata.EntryPoint(name, value, group.replace("_", "."))
        for group, items in groups.items()
        for name, value in items.items()
    ]

    def fake(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


SIGNAL_EPS = {
    "probe": f"{HERE}:ProbeSource",
    "loose": f"{HERE}:LooseSource",
    "nosource": f"{HERE}:NotASource",
    "broken": "ferry_no_such_module:Source",
    "memory": f"{HERE}:ProbeSource",  # may not shadow the built-in
}
ACTION_EPS = {"hook": f"{HERE}:HookAction", "wrongname": f"{HERE}:WrongNameAction"}


@pytest.fixture(autouse=True)
def plugins_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    entry_points(monkeypatch, ferry_signals=SIGNAL_EPS, ferry_actions=ACTION_EPS)


def write_config(tmp_path: Path, signals: list[Any], actions: list[Any] = ()) -> Path:  # type: ignore[assignment]
    (tmp_path / "policies").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    config = {
        "name": "node-a",
        "state_dir": str(tmp_path),
        "signals": {"plugins": signals},
        "actions": {"plugins": list(actions)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def load(path: Path, migrations: Any = None) -> Plugins:
    cfg = load_config(path, environ={})
    return load_plugins(
        cfg,
        str(path),
        default_registry(),
        default_action_factories(),
        SourceContext(interval=2.0, host=cfg.name),
        lambda name: ActionContext(
            name=name,
            host=cfg.name,
            clock=SystemClock(),
            log=None,
            migrations=migrations or NoMigrations(),
        ),
    )


def problems(path: Path) -> list[str]:
    with pytest.raises(InputError) as err:
        load(path)
    return err.value.lines()


def test_configured_source_and_action_are_built_with_context_and_params(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [{"type": "probe", "name": "web", "url": "http://127.0.0.1:1/", "interval": "3"}],
        [{"type": "hook", "name": "notify", "argv": ["true"]}],
    )
    plugins = load(path)
    [guarded] = plugins.sources
    source = guarded.source
    assert isinstance(source, ProbeSource)
    assert source.ctx.name == "web" and source.ctx.host == "node-a" and source.ctx.interval == 2.0
    assert source.params == ProbeParams(url="http://127.0.0.1:1/", interval=3.0)
    assert guarded.name == "probe.web" and guarded.max_ages() == {"probe.web.": 9.0}
    assert plugins.declared == {"web": ["probe.web.up"]}
    assert "probe.web.up" in plugins.signal_patterns() and "load.1" in plugins.signal_patterns()
    [action] = plugins.actions
    assert isinstance(action, HookAction) and action.argv == ["true"]
    assert action.ctx.name == "notify" and action.ctx.host == "node-a"
    assert plugins.action_names() == {"evacuate", "move", "log", "notify"}


def test_undeclared_samples_are_dropped(tmp_path: Path) -> None:
    plugins = load(write_config(tmp_path, [{"type": "probe", "name": "web", "url": "u"}]))
    got: list[str] = []

    class Sink:
        def publish(self, sample: Sample) -> None:
            got.append(sample.name)

        def publish_event(self, event: Any) -> None:
            raise AssertionError

    run_async(plugins.sources[0].run(Sink()))
    assert got == ["probe.web.up"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "probe", "name": "web"}, "signals.plugins[0].url: field required"),
        (
            {"type": "probe", "name": "web", "url": "u", "colour": "blue"},
            "signals.plugins[0].colour: unknown key",
        ),
        (
            {"type": "probe", "name": "web", "url": "u", "interval": 0},
            "signals.plugins[0].interval: input should be greater than 0",
        ),
        (
            {"type": "nope", "name": "web"},
            "signals.plugins[0].type: unknown signal source type 'nope'; installed plugins:",
        ),
        (
            {"type": "memory", "name": "web"},
            "signals.plugins[0].type: 'memory' is a built-in source",
        ),
        (
            {"type": "broken", "name": "web"},
            "signals.plugins[0]: signal source plugin 'broken' failed to load: ModuleNotFoundError",
        ),
        (
            {"type": "loose", "name": "web"},
            "signals.plugins[0]: signal source plugin 'loose' failed to load: "
            f"{HERE}:LooseSource: its `Params` model must set extra='forbid'",
        ),
        (
            {"type": "nosource", "name": "web", "url": "u"},
            "signals.plugins[0]: signal source plugin 'nosource' (entry point "
            f"{HERE}:NotASource) returned NotASource, which lacks",
        ),
        (
            {"type": "probe", "name": "web", "url": "u", "extra_signal": "load.1"},
            "signals.plugins[0]: declared signal 'load.1' clashes with the built-in signals load.*",
        ),
        (
            {"type": "probe", "name": "web", "url": "u", "extra_signal": "marker.web"},
            "signals.plugins[0]: declared signal 'marker.web' clashes with the built-in "
            "signals marker.*",
        ),
        (
            {"type": "probe", "name": "web", "url": "u", "extra_signal": "Probe Up"},
            "signals.plugins[0]: declared signal 'Probe Up' is not a dotted lower-case name",
        ),
    ],
)
def test_bad_signal_plugin_entry_names_file_and_key(
    tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    path = write_config(tmp_path, [entry])
    lines = problems(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: {expected}"), lines


def test_two_sources_declaring_the_same_signal_clash(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [
            {"type": "probe", "name": "web", "url": "u"},
            {"type": "probe", "name": "api", "url": "u", "extra_signal": "probe.web.*"},
        ],
    )
    assert problems(path) == [
        f"{path}: signals.plugins[1]: declared signal 'probe.web.*' clashes with "
        "'probe.web.up' of signal plugin 'web'"
    ]


def test_config_refuses_duplicate_plugin_names(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        [{"type": "probe", "name": "web", "url": "u"}, {"type": "probe", "name": "web"}],
    )
    with pytest.raises(InputError) as err:
        load_config(path, environ={})
    assert err.value.lines() == [f"{path}: signals.plugins: duplicate signal plugin name(s): web"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "hook", "name": "notify"}, "actions.plugins[0].argv: field required"),
        (
            {"type": "hook", "name": "evacuate", "argv": ["x"]},
            "actions.plugins[0].name: 'evacuate' is a built-in action's name",
        ),
        (
            {"type": "wrongname", "name": "notify", "argv": ["x"]},
            "actions.plugins[0]: action plugin 'wrongname' named its action 'something-else'",
        ),
        (
            {"type": "webhook", "name": "notify"},
            "actions.plugins[0].type: unknown action type 'webhook'; installed plugins: "
            "hook, wrongname",
        ),
    ],
)
def test_bad_action_plugin_entry_names_file_and_key(
    tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    path = write_config(tmp_path, [], [entry])
    lines = problems(path)
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {expected}"), lines


def test_action_reaches_the_migration_hooks(tmp_path: Path) -> None:
    calls: list[Decision] = []

    class Hooks(NoMigrations):
        async def evacuate(self, decision: Decision) -> ActionResult:
            calls.append(decision)
            return ActionResult(ok=True, message="evacuate: moved 0 of 0")

    path = write_config(tmp_path, [], [{"type": "hook", "name": "notify", "argv": ["x"]}])
    [action] = load(path, Hooks()).actions
    decision = Decision("p", "notify", [], [], "because")
    result = run_async(action.execute(decision))
    assert result.ok and calls == [decision]


def test_checks_build_plugins_without_migrations(tmp_path: Path) -> None:
    path = write_config(tmp_path, [], [{"type": "hook", "name": "notify", "argv": ["x"]}])
    [action] = plugins_for_checks(load_config(path, environ={}), str(path)).actions
    with pytest.raises(RuntimeError, match="a configuration check does not migrate"):
        asyncio.run(action.execute(Decision("p", "notify", [], [], "")))  # type: ignore[arg-type]


# -- the CLI checks load plugins the way `ferry run` does -------------------------

PLUGIN_POLICY = """
policies:
  - name: web-down
    when: {signal: probe.web.up, op: "<", value: 1}
    action: notify
"""


def ferry(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"FERRY_CONFIG": ""})


def cli_setup(tmp_path: Path, signals: list[Any]) -> Path:
    path = write_config(tmp_path, signals, [{"type": "hook", "name": "notify", "argv": ["x"]}])
    (tmp_path / "policies" / "web.yaml").write_text(PLUGIN_POLICY)
    return path


def test_check_config_accepts_plugin_signals_and_actions(tmp_path: Path) -> None:
    path = cli_setup(tmp_path, [{"type": "probe", "name": "web", "url": "u"}])
    result = ferry("check-config", str(path))
    assert result.exit_code == 0, result.output
    assert "signal plugin web: publishes probe.web.up" in result.stdout
    assert f"action plugin notify: {HERE}" in result.stdout
    assert "web-down" in result.stdout


def test_check_config_reports_a_clash_and_a_policy_on_an_undeclared_signal(
    tmp_path: Path,
) -> None:
    path = cli_setup(
        tmp_path, [{"type": "probe", "name": "web", "url": "u", "extra_signal": "mem.x.*"}]
    )
    result = ferry("check-config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines() == [
        f"{path}: signals.plugins[0]: declared signal 'mem.x.*' clashes with the built-in "
        "signals mem.*; publish under the plugin's own prefix"
    ]
    other = tmp_path / "other"
    other.mkdir()
    path = cli_setup(other, [{"type": "probe", "name": "api", "url": "u"}])
    result = ferry("check-config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "policies[web-down].when.signal: unknown signal 'probe.web.up'" in result.stderr


def test_check_policies_knows_plugins_only_with_their_config(tmp_path: Path) -> None:
    path = cli_setup(tmp_path, [{"type": "probe", "name": "web", "url": "u"}])
    policies = str(tmp_path / "policies")
    without = ferry("check-policies", policies)
    assert without.exit_code == EXIT_BAD_INPUT
    assert "unknown signal 'probe.web.up'" in without.stderr
    assert "unknown action 'notify'" in without.stderr
    assert without.stderr.splitlines()[-1].startswith("note: plugin signals and actions")
    with_config = ferry("check-policies", policies, "--config", str(path))
    assert with_config.exit_code == 0, with_config.output
    assert "ok: 1 policies" in with_config.stdout


def test_test_policy_runs_plugin_policies_with_config(tmp_path: Path) -> None:
    path = cli_setup(tmp_path, [{"type": "probe", "name": "web", "url": "u"}])
    timeline = tmp_path / "tl.yaml"
    timeline.write_text(
        yaml.safe_dump(
            {
                "peers": [{"name": "node-b"}],
                "containers": [{"name": "web", "labels": {"ferry.migrate": "true"}}],
                "until": "30s",
                "steps": [
                    {"at": "0s", "signals": {"probe.web.up": 1}},
                    {"at": "10s", "signals": {"probe.web.up": 0}},
                ],
                "expect": [
                    {"policy": "web-down", "event": "firing", "at": "10s"},
                    {
                        "policy": "web-down",
                        "event": "skipped",
                        "reason": "dry_run",
                        "at": "10s",
                        "containers": ["web"],
                        "targets": ["node-b"],
                    },
                ],
            }
        )
    )
    result = ferry(
        "test-policy",
        str(timeline),
        "--policies",
        str(tmp_path / "policies"),
        "--config",
        str(path),
    )
    assert result.exit_code == 0, result.output
    assert "expectations: 2/2 held" in result.output


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ferry-http-probe"


def test_example_package_checks_out_through_check_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/ferry-http-probe as its own pyproject.toml registers it (not installed here)."""
    import tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    entry_points(
        monkeypatch, ferry_signals=meta["ferry.signals"], ferry_actions=meta["ferry.actions"]
    )
    path = write_config(
        tmp_path,
        [{"type": "http_probe", "name": "web", "url": "http://127.0.0.1:8080/", "interval": "5s"}],
        [{"type": "evacuate_then_run", "name": "evacuate-and-tell", "argv": ["true"]}],
    )
    (tmp_path / "policies" / "web.yaml").write_text(
        "policies:\n  - name: web-down\n"
        "    when: {signal: http_probe.web.up, op: '<', value: 1}\n"
        "    action: evacuate-and-tell\n"
    )
    result = ferry("check-config", str(path))
    assert result.exit_code == 0, result.output
    assert (
        "signal plugin web: publishes http_probe.web.up, http_probe.web.status, "
        "http_probe.web.latency_seconds"
    ) in result.stdout
    bad = write_config(
        tmp_path / "policies",
        [{"type": "http_probe", "name": "web", "url": "ftp://x", "timeout": "1m"}],
    )
    result = ferry("check-config", str(bad))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines() == [
        f"{bad}: signals.plugins[0].url: expected an http:// or https:// URL, got 'ftp://x'"
    ]

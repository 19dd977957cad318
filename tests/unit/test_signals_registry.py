"""SourceRegistry: the built-in sources by name, as `build_default_sources` creates them.

Plugins from the `ferry.signals` entry point group are tested where production
loads them, through the config: tests/unit/test_plugins.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.model import SignalSink
from agent.signals.command import CommandMonitorSpec, CommandSource
from agent.signals.docker_events import DockerEventsSource
from agent.signals.markers import MarkerSource
from agent.signals.memory import MemoryDiskSource
from agent.signals.pressure import HostLoadSource
from agent.signals.registry import (
    SourceContext,
    SourceError,
    SourceRegistry,
    build_default_sources,
    default_registry,
)
from agent.signals.store import SignalStore


class SomeSource:
    def __init__(self, ctx: SourceContext) -> None:
        self.name = "some"

    async def run(self, sink: SignalSink) -> None:
        return None


def not_a_source(ctx: SourceContext) -> Any:
    return object()


class NoAdapter:
    def events(self, since: float | None, until: float | None = None) -> Any:
        raise AssertionError

    def list_containers(self) -> list[dict[str, Any]]:
        return []

    def inspect_container(self, container: str) -> dict[str, Any]:
        return {}


def test_builtins_registered_by_name_and_registries_are_independent() -> None:
    registry = default_registry(plugins=False)
    assert registry.names() == ["command", "docker_events", "host_load", "markers", "memory"]
    assert registry.origin("memory") == "builtin"
    registry.unregister("memory")
    assert "memory" not in registry
    assert "memory" in default_registry(plugins=False)  # no hidden global state


def test_create_builtins_with_params(tmp_path: Path) -> None:
    registry = default_registry(plugins=False)
    ctx = SourceContext(proc_root=tmp_path, interval=7.0)
    load = registry.create("host_load", ctx)
    assert isinstance(load, HostLoadSource)
    assert (load.proc_root, load.interval) == (tmp_path, 7.0)
    cmd = registry.create("command", ctx, name="ntp", command=["true"], interval=9, timeout=1)
    assert isinstance(cmd, CommandSource) and cmd.name == "command.ntp"

    with pytest.raises(SourceError, match="unknown signal source type 'nope'"):
        registry.create("nope", ctx)
    with pytest.raises(SourceError, match="bad parameters"):
        registry.create("host_load", ctx, colour="blue")
    with pytest.raises(SourceError, match="needs a Docker adapter"):
        registry.create("docker_events", ctx)


def test_duplicate_registration_is_refused() -> None:
    registry = SourceRegistry()
    registry.register("x", SomeSource)
    with pytest.raises(SourceError, match="already registered"):
        registry.register("x", SomeSource)


def test_factory_must_return_a_signal_source() -> None:
    registry = SourceRegistry()
    registry.register("bad", not_a_source, origin="test")
    with pytest.raises(SourceError, match="returned object"):
        registry.create("bad", SourceContext())


def test_build_default_sources(tmp_path: Path) -> None:
    sources = build_default_sources(
        proc_root=tmp_path / "proc",
        data_root=tmp_path / "docker",
        markers={"drain": tmp_path / "drain"},
        command_monitors=[CommandMonitorSpec("raid", ["/usr/local/bin/check-raid"], 20, 5)],
        docker_adapter=NoAdapter(),
        interval=2.0,
    )
    kinds = [type(s) for s in sources]
    assert kinds == [
        HostLoadSource,
        MemoryDiskSource,
        MarkerSource,
        CommandSource,
        DockerEventsSource,
    ]
    memory = sources[1]
    assert isinstance(memory, MemoryDiskSource) and memory.data_root == tmp_path / "docker"
    command = sources[3]
    assert isinstance(command, CommandSource)
    assert command.spec.command == ["/usr/local/bin/check-raid"] and command.spec.timeout == 5

    minimal = build_default_sources(tmp_path, tmp_path, {}, [], None)
    assert [type(s) for s in minimal] == [HostLoadSource, MemoryDiskSource]

    store = SignalStore(default_max_age=1.0)
    store.adopt_hints(sources)
    assert store.max_age_for("load.1") == 15.0
    assert store.max_age_for("docker.connected") is None
    command_age = store.max_age_for("command.raid")
    assert command_age is not None and command_age > 25  # interval + timeout, with slack

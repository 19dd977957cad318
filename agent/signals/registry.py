"""Which signal sources exist, by name: built-ins plus third-party plugins.

Modelled on prometheus_client's CollectorRegistry, but explicit: there is no
module-level default registry, the runtime creates one (`default_registry()`)
and passes it on, so tests and embedders never share hidden state.

A source factory is called as `factory(context, **params)` and returns a
`SignalSource`. Third-party packages publish factories (or classes with that
signature) under the `ferry.signals` entry point group:

    [project.entry-points."ferry.signals"]
    smart = "ferry_smart:SmartSource"
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.model import Clock, SignalSource, SystemClock
from agent.signals.command import CommandMonitorSpec, CommandSource
from agent.signals.docker_events import DockerEventsAPI, DockerEventsSource
from agent.signals.markers import MarkerSource
from agent.signals.memory import MemoryDiskSource
from agent.signals.pressure import HostLoadSource

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "ferry.signals"


@dataclass
class SourceContext:
    """What every factory may need besides its own parameters."""

    clock: Clock = field(default_factory=SystemClock)
    proc_root: Path = Path("/proc")
    data_root: Path = Path("/var/lib/docker")
    interval: float = 5.0
    docker_adapter: DockerEventsAPI | None = None


SourceFactory = Callable[..., SignalSource]


class SourceError(Exception):
    pass


class SourceRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, SourceFactory] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str, factory: SourceFactory, *, origin: str = "builtin") -> None:
        """Add a factory; a name can be registered once (like duplicate collectors)."""
        if name in self._factories:
            raise SourceError(
                f"signal source {name!r} already registered (by {self._origin[name]})"
            )
        self._factories[name] = factory
        self._origin[name] = origin

    def unregister(self, name: str) -> None:
        self._factories.pop(name, None)
        self._origin.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def create(self, kind: str, context: SourceContext, /, **params: Any) -> SignalSource:
        """Build a source of registered type `kind` with its config parameters."""
        try:
            factory = self._factories[kind]
        except KeyError:
            raise SourceError(
                f"unknown signal source {kind!r}; known: {', '.join(self.names()) or 'none'}"
            ) from None
        try:
            source = factory(context, **params)
        except TypeError as exc:
            raise SourceError(f"signal source {kind!r}: bad parameters: {exc}") from exc
        if not isinstance(source, SignalSource):
            raise SourceError(
                f"signal source {kind!r} from {self._origin[kind]} returned "
                f"{type(source).__name__}, which has no `name` and `async run(sink)`"
            )
        return source

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register every plugin in `group`; returns the names added.

        A broken or clashing plugin is logged and skipped: one bad package must
        not stop the agent from watching the host.
        """
        added: list[str] = []
        for ep in importlib.metadata.entry_points(group=group):
            if ep.name in self._factories:
                log.warning(
                    "signals.plugin_name_taken",
                    plugin=ep.name,
                    value=ep.value,
                    taken_by=self._origin[ep.name],
                )
                continue
            try:
                factory = ep.load()
            except Exception as exc:
                log.warning(
                    "signals.plugin_load_failed", plugin=ep.name, value=ep.value, error=repr(exc)
                )
                continue
            if not callable(factory):
                log.warning("signals.plugin_not_callable", plugin=ep.name, value=ep.value)
                continue
            self.register(ep.name, factory, origin=f"entry point {ep.value}")
            added.append(ep.name)
            log.info("signals.plugin_loaded", plugin=ep.name, value=ep.value)
        return added


# -- built-in factories ------------------------------------------------------


def _host_load(ctx: SourceContext, interval: float | None = None) -> HostLoadSource:
    return HostLoadSource(ctx.proc_root, ctx.clock, interval or ctx.interval)


def _memory(ctx: SourceContext, interval: float | None = None) -> MemoryDiskSource:
    return MemoryDiskSource(ctx.proc_root, ctx.data_root, ctx.clock, interval or ctx.interval)


def _markers(
    ctx: SourceContext, markers: Mapping[str, Path], rescan_interval: float | None = None
) -> MarkerSource:
    return MarkerSource(markers, ctx.clock, rescan_interval=rescan_interval or ctx.interval)


def _command(
    ctx: SourceContext,
    name: str,
    command: str | list[str],
    interval: float = 30.0,
    timeout: float = 10.0,
    env: dict[str, str] | None = None,
) -> CommandSource:
    return CommandSource(CommandMonitorSpec(name, command, interval, timeout, env or {}), ctx.clock)


def _docker_events(ctx: SourceContext) -> DockerEventsSource:
    if ctx.docker_adapter is None:
        raise SourceError("signal source 'docker_events' needs a Docker adapter")
    return DockerEventsSource(ctx.docker_adapter, ctx.clock)


BUILTINS: dict[str, SourceFactory] = {
    "host_load": _host_load,
    "memory": _memory,
    "markers": _markers,
    "command": _command,
    "docker_events": _docker_events,
}


def default_registry(*, plugins: bool = True) -> SourceRegistry:
    """A new registry with the built-ins, and the `ferry.signals` plugins unless disabled."""
    registry = SourceRegistry()
    for name, factory in BUILTINS.items():
        registry.register(name, factory)
    if plugins:
        registry.load_entry_points()
    return registry


def build_default_sources(
    proc_root: Path,
    data_root: Path,
    markers: Mapping[str, Path],
    command_monitors: Iterable[CommandMonitorSpec],
    docker_adapter: DockerEventsAPI | None,
    clock: Clock | None = None,
    interval: float = 5.0,
    registry: SourceRegistry | None = None,
) -> list[SignalSource]:
    """The sources every agent runs: host load, memory/disk, markers, commands, Docker events.

    Marker and Docker sources are left out when there is nothing to watch or
    no adapter. Feed the result to `SignalStore.adopt_hints` for staleness.
    """
    registry = registry or default_registry(plugins=False)
    ctx = SourceContext(
        clock=clock or SystemClock(),
        proc_root=Path(proc_root),
        data_root=Path(data_root),
        interval=interval,
        docker_adapter=docker_adapter,
    )
    sources = [registry.create("host_load", ctx), registry.create("memory", ctx)]
    if markers:
        sources.append(registry.create("markers", ctx, markers=dict(markers)))
    for spec in command_monitors:
        sources.append(
            registry.create(
                "command",
                ctx,
                name=spec.name,
                command=spec.command if isinstance(spec.command, str) else list(spec.command),
                interval=spec.interval,
                timeout=spec.timeout,
                env=dict(spec.env),
            )
        )
    if docker_adapter is not None:
        sources.append(registry.create("docker_events", ctx))
    return sources

"""Which signal sources exist, by type name: built-ins plus third-party plugins.

Modelled on prometheus_client's CollectorRegistry, but explicit: there is no
module-level default registry, the runtime creates one (`default_registry()`)
and passes it on, so tests and embedders never share hidden state.

Built-in factories are called as `factory(context, **params)` by
`build_default_sources`. Plugin factories come from the `ferry.signals` entry
point group and are called as `factory(context, params)`, with `params`
validated by the factory's own `Params` model; the config names them under
`signals.plugins` (agent/plugin_loader.py, docs/plugins.md):

    [project.entry-points."ferry.signals"]
    smart = "ferry_smart:SmartSource"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from agent.model import Clock, Sample, SignalSink, SignalSource, SystemClock
from agent.plugin_registry import FactoryRegistry, PluginError, factory_problem, validate_params
from agent.signals.command import CommandMonitorSpec, CommandSource
from agent.signals.docker_events import DockerEventsAPI, DockerEventsSource
from agent.signals.markers import MarkerSource
from agent.signals.memory import MemoryDiskSource
from agent.signals.pressure import HostLoadSource
from agent.signals.store import StalenessHints

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "ferry.signals"


@dataclass(frozen=True)
class SourceContext:
    """What every factory may need besides its own parameters."""

    clock: Clock = field(default_factory=SystemClock)
    proc_root: Path = Path("/proc")
    data_root: Path = Path("/var/lib/docker")
    interval: float = 5.0  # the config's signals.poll_interval
    docker_adapter: DockerEventsAPI | None = None
    host: str = ""  # this agent's name (the config's `name`)
    name: str = ""  # a plugin's instance name from its config entry; "" for built-ins


@runtime_checkable
class PluginSource(Protocol):
    """A third-party source: a `SignalSource` that says which signals it publishes.

    `publishes()` returns signal names or glob patterns (``http_probe.web.*``);
    policies may use exactly those, and the agent drops anything else it publishes.
    """

    name: str

    async def run(self, sink: SignalSink) -> None: ...

    def publishes(self) -> Sequence[str]: ...


SourceFactory = Callable[..., SignalSource]


class SourceError(PluginError):
    pass


class SourceRegistry(FactoryRegistry[SourceFactory]):
    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP, "signal source")

    def register(self, name: str, factory: SourceFactory, *, origin: str = "builtin") -> None:
        try:
            super().register(name, factory, origin=origin)
        except PluginError as exc:
            raise SourceError(exc.reason) from None

    def create(self, kind: str, context: SourceContext, /, **params: Any) -> SignalSource:
        """Build a built-in source of type `kind` with its parameters."""
        try:
            factory = self.factory(kind)
        except PluginError as exc:
            raise SourceError(exc.reason) from None
        try:
            source = factory(context, **params)
        except TypeError as exc:
            raise SourceError(f"signal source {kind!r}: bad parameters: {exc}") from exc
        if not isinstance(source, SignalSource):
            raise SourceError(
                f"signal source {kind!r} from {self.origin(kind)} returned "
                f"{type(source).__name__}, which has no `name` and `async run(sink)`"
            )
        return source

    def create_plugin(
        self, kind: str, name: str, raw_params: Mapping[str, Any], context: SourceContext
    ) -> PluginSource:
        """Build a configured plugin source; raises PluginError or pydantic's ValidationError.

        Building must not start anything: `ferry check-config` builds sources too.
        """
        factory = self.factory(kind)
        if self.is_builtin(kind):
            raise PluginError(
                f"{kind!r} is a built-in source; Ferry runs it itself (see signals.*)", key="type"
            )
        problem = factory_problem(factory)
        if problem is not None:
            raise PluginError(f"signal source plugin {kind!r} ({self.origin(kind)}): {problem}")
        params = validate_params(factory, raw_params)
        try:
            source = factory(dataclasses.replace(context, name=name), params)
        except Exception as exc:
            raise PluginError(
                f"signal source plugin {kind!r} refused its parameters: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(source, PluginSource):
            raise PluginError(
                f"signal source plugin {kind!r} ({self.origin(kind)}) returned "
                f"{type(source).__name__}, which lacks `name`, `async run(sink)` or `publishes()`"
            )
        return source


class DeclaredOnlySink:
    """Passes on only the samples a plugin declared; a plugin must not write `load.1`."""

    def __init__(self, sink: SignalSink, source: str, allowed: Callable[[str], bool]) -> None:
        self._sink = sink
        self._source = source
        self._allowed = allowed
        self._refused: set[str] = set()

    def publish(self, sample: Sample) -> None:
        if self._allowed(sample.name):
            self._sink.publish(sample)
        elif sample.name not in self._refused:
            self._refused.add(sample.name)  # once per name: a loop must not flood the log
            log.warning(
                "signals.undeclared_sample_dropped",
                source=self._source,
                signal=sample.name,
                reason="not in the names the source declared with publishes()",
            )

    def publish_event(self, event: Any) -> None:
        log.warning("signals.plugin_event_dropped", source=self._source, action=event.action)


class GuardedSource:
    """Runs a plugin source against a `DeclaredOnlySink`; keeps its name and staleness hints."""

    def __init__(self, source: PluginSource, allowed: Callable[[str], bool]) -> None:
        self.source = source
        self.name = source.name
        self._allowed = allowed

    def max_ages(self) -> dict[str, float | None]:
        if isinstance(self.source, StalenessHints):
            return self.source.max_ages()
        return {}

    async def run(self, sink: SignalSink) -> None:
        await self.source.run(DeclaredOnlySink(sink, self.name, self._allowed))


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
    """A new registry with the built-ins, and the `ferry.signals` plugins unless disabled.

    `build_default_sources` needs only the built-ins; the agent and the CLI load the
    plugins too, through `agent.plugin_loader`.
    """
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

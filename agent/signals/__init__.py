"""Signal sources (host load, memory/disk, marker files, command monitors, Docker events)
and the store they publish into, which the policy engine reads as a `SignalView`."""

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
from agent.signals.runner import run_sources, supervise
from agent.signals.store import SignalStore

__all__ = [
    "CommandMonitorSpec",
    "CommandSource",
    "DockerEventsSource",
    "HostLoadSource",
    "MarkerSource",
    "MemoryDiskSource",
    "SignalStore",
    "SourceContext",
    "SourceError",
    "SourceRegistry",
    "build_default_sources",
    "default_registry",
    "run_sources",
    "supervise",
]

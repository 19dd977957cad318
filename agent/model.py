"""Types shared across Ferry's parts.

Signal sources, the policy engine, actions, the migration engine and the
service all meet here, so each part can be built and tested alone against
these small types and Protocols.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class Clock(Protocol):
    """Injectable time, so the engine and sources run under a fake clock in tests."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


@dataclass(frozen=True)
class Sample:
    """One reading of one signal, e.g. name="psi.cpu.some.avg10", value=12.5.

    Naming: dotted lower-case. Booleans are 1.0 / 0.0 (e.g. "marker.drain").
    Command monitors map OK / problem / unknown to 0 / 1 / 2.
    """

    name: str
    value: float
    ts: float  # wall-clock seconds
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DockerEvent:
    """One container event from the Docker event stream."""

    action: str  # start, die, destroy, rename, health_status, oom, create, ...
    container_id: str
    name: str
    ts: float  # wall-clock seconds (from timeNano)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class ContainerInfo:
    """What policies select on. Kept current by the Docker events source."""

    id: str
    name: str
    image: str
    image_id: str
    labels: dict[str, str]
    state: str  # running, exited, ...
    memory_bytes: int = 0  # resident usage when known, else the limit, else 0
    created: float = 0.0


@dataclass
class PeerHealth:
    """What a peer reports on its health endpoint; placement reads it."""

    name: str
    reachable: bool
    draining: bool = False
    overloaded: bool = False
    load1: float = 0.0
    cpu_pressure: float = 0.0  # PSI cpu some avg10, or load per core when PSI is absent
    mem_available_bytes: int = 0
    disk_free_bytes: int = 0
    running_containers: int = 0
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    error: str | None = None
    # `ferry.spread` keys running on or moving to the peer: no second replica goes there.
    spread: tuple[str, ...] = ()
    protocol: int = 1  # the peer protocol it speaks (agent.peer.protocol)
    protocol_oldest: int = 1  # the oldest it still migrates with


class SignalSink(Protocol):
    """Where sources deliver readings and events."""

    def publish(self, sample: Sample) -> None: ...

    def publish_event(self, event: DockerEvent) -> None: ...


@runtime_checkable
class SignalSource(Protocol):
    """A source of signals. `run` delivers to the sink until cancelled."""

    name: str

    async def run(self, sink: SignalSink) -> None: ...


@dataclass
class Decision:
    """What a firing policy asks an action to do."""

    policy: str
    action: str  # "evacuate" | "move" | "log" | third-party name
    containers: list[ContainerInfo]
    targets: list[str]  # chosen peer per container, same order (may be empty for "log")
    reason: str
    dry_run: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActionResult:
    ok: bool
    message: str
    per_container: dict[str, str] = field(default_factory=dict)  # container name -> outcome


@runtime_checkable
class Action(Protocol):
    """Something a policy can trigger. Migration plugs in here."""

    name: str

    async def execute(self, decision: Decision) -> ActionResult: ...


class PeerDirectory(Protocol):
    """Current view of the peers, for placement."""

    def peers(self) -> list[PeerHealth]: ...


class SignalView(Protocol):
    """Read side of the signal store; what the policy engine evaluates against."""

    def value(self, name: str) -> float | None:
        """Latest value of a signal, or None if never seen (or stale)."""
        ...

    def names(self) -> list[str]: ...

    def event_count(self, action: str, since: float) -> int:
        """Docker events with this action at or after wall-clock `since`."""
        ...

    def containers(self) -> list[ContainerInfo]:
        """Current container inventory of this host."""
        ...


# Containers sharing a value of this label (replicas of one service) are never placed
# on the same host by Ferry.
SPREAD_LABEL = "ferry.spread"


# A container moves with every other container sharing one of these labels
# (first found wins): an explicit Ferry group, else its compose project.
GROUP_LABELS = ("ferry.group", "com.docker.compose.project")


def group_of_labels(labels: dict[str, str] | None) -> str | None:
    for key in GROUP_LABELS:
        value = (labels or {}).get(key)
        if value:
            return str(value)
    return None

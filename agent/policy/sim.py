"""In-memory stand-ins for the clock, signal store and peer directory.

``ferry test-policy`` replays timelines on them, and unit tests use them to
drive the engine deterministically (no sleeps, no real time).
"""

from __future__ import annotations

from agent.model import ContainerInfo, DockerEvent, PeerHealth


class ManualClock:
    """A clock that only moves when told to. Wall time = `epoch` + monotonic."""

    def __init__(self, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch = epoch

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds

    def set(self, now: float) -> None:
        self.advance(now - self._now)


class MemorySignals:
    """A SignalView over plain dicts: the latest value per signal, events, inventory."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.events: list[DockerEvent] = []
        self.inventory: list[ContainerInfo] = []

    def set(self, name: str, value: float | None) -> None:
        if value is None:
            self.values.pop(name, None)
        else:
            self.values[name] = float(value)

    def value(self, name: str) -> float | None:
        return self.values.get(name)

    def names(self) -> list[str]:
        return sorted(self.values)

    def add_event(self, event: DockerEvent) -> None:
        self.events.append(event)

    def event_count(self, action: str, since: float) -> int:
        return sum(1 for e in self.events if e.action == action and e.ts >= since)

    def containers(self) -> list[ContainerInfo]:
        return list(self.inventory)


class StaticPeers:
    """A PeerDirectory whose answers the caller sets."""

    def __init__(self, peers: list[PeerHealth] | None = None) -> None:
        self.current: list[PeerHealth] = list(peers or [])

    def peers(self) -> list[PeerHealth]:
        return list(self.current)

"""The signal store: the one place sources write to and the policy engine reads from.

It keeps the latest sample per signal (with staleness, so a dead source reads
as "unknown" rather than as its last good value), a bounded history of Docker
events for rate-style conditions, and the container inventory. Readers can
wait for a change, so a marker file appearing triggers policy evaluation at
once instead of at the next evaluation tick.

All methods are thread-safe; change notification is delivered on the event
loop that called `wait_changed` (listeners run in the publishing thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from agent.model import Clock, ContainerInfo, DockerEvent, Sample, SystemClock

log = structlog.get_logger(__name__)

# Label keys sources use to attach text to a sample.
LABEL_CONTENT = "content"  # marker file content
LABEL_REASON = "reason"  # command monitor's first output line

Listener = Callable[[str], None]


@runtime_checkable
class InventorySink(Protocol):
    """Optional sink capability: the Docker events source pushes inventory snapshots."""

    def set_containers(self, containers: Iterable[ContainerInfo]) -> None: ...


@runtime_checkable
class StalenessHints(Protocol):
    """Optional source capability: how long its signals stay valid.

    Keys are signal names or prefixes ending in "."; None means never stale.
    """

    def max_ages(self) -> dict[str, float | None]: ...


@dataclass(frozen=True)
class _Entry:
    sample: Sample
    received: float  # clock.monotonic() at publish; immune to wall-clock jumps


class SignalStore:
    """Implements both `SignalSink` and `SignalView` (see agent/model.py).

    `default_max_age` applies to signals without a more specific rule from
    `set_max_age`; None disables staleness. Events older than
    `event_horizon` seconds (wall clock) or beyond `max_events` are dropped.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        default_max_age: float | None = 60.0,
        max_events: int = 10_000,
        event_horizon: float = 3600.0,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._default_max_age = default_max_age
        self._max_ages: dict[str, float | None] = {}
        self._event_horizon = event_horizon
        self._lock = threading.Lock()
        self._latest: dict[str, _Entry] = {}
        self._events: deque[DockerEvent] = deque(maxlen=max_events)
        self._containers: dict[str, ContainerInfo] = {}
        self._version = 0
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = []

    # -- configuration ---------------------------------------------------

    def set_max_age(self, name_or_prefix: str, max_age: float | None) -> None:
        """Staleness for one signal, or for all under a prefix ending in "." (longest wins)."""
        with self._lock:
            self._max_ages[name_or_prefix] = max_age

    def adopt_hints(self, sources: Iterable[object]) -> None:
        """Take staleness rules from sources that declare them (`StalenessHints`)."""
        for source in sources:
            if isinstance(source, StalenessHints):
                for key, age in source.max_ages().items():
                    self.set_max_age(key, age)

    def max_age_for(self, name: str) -> float | None:
        """Seconds a sample of `name` stays valid (None: forever)."""
        if name in self._max_ages:
            return self._max_ages[name]
        best: str | None = None
        for key in self._max_ages:
            if not (key.endswith(".") and name.startswith(key)):
                continue
            if best is None or len(key) > len(best):
                best = key
        return self._max_ages[best] if best is not None else self._default_max_age

    # -- SignalSink ------------------------------------------------------

    def publish(self, sample: Sample) -> None:
        with self._lock:
            previous = self._latest.get(sample.name)
            now = self._clock.monotonic()
            self._latest[sample.name] = _Entry(sample, now)
            # Polling sources republish unchanged values every interval; waking
            # the policy engine for those would turn "react to change" into
            # "re-evaluate every tick". A stale value coming back is a change.
            changed = (
                previous is None
                or previous.sample.value != sample.value
                or previous.sample.labels != sample.labels
                or self._is_stale(sample.name, previous, now)
            )
            if changed:
                self._version += 1
        if changed:
            self._notify(sample.name)

    def publish_event(self, event: DockerEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._prune_events_locked()
            self._version += 1
        self._notify(f"event.{event.action}")

    def set_containers(self, containers: Iterable[ContainerInfo]) -> None:
        new = {c.id: c for c in containers}
        with self._lock:
            if new == self._containers:
                return
            self._containers = new
            self._version += 1
        self._notify("containers")

    # -- SignalView ------------------------------------------------------

    def value(self, name: str) -> float | None:
        entry = self._fresh(name)
        return entry.sample.value if entry else None

    def names(self) -> list[str]:
        with self._lock:
            now = self._clock.monotonic()
            return sorted(n for n, e in self._latest.items() if not self._is_stale(n, e, now))

    def event_count(self, action: str, since: float) -> int:
        """Events at or after `since` whose action matches.

        `action` is either the base action ("health_status", "exec_create") or
        base and detail joined by a colon ("health_status:unhealthy"), because
        Docker folds the detail into the action string for those events.
        """
        want = _normalise_action(action)
        with self._lock:
            return sum(1 for e in self._events if e.ts >= since and _matches(e, want))

    def containers(self) -> list[ContainerInfo]:
        with self._lock:
            return sorted(self._containers.values(), key=lambda c: c.name)

    # -- extras for the runtime, health endpoint and CLI -----------------

    def sample(self, name: str) -> Sample | None:
        """Latest fresh sample, with its labels."""
        entry = self._fresh(name)
        return entry.sample if entry else None

    def marker_content(self, name: str) -> str | None:
        """Content of marker file `name` while it is present (e.g. the drain reason)."""
        entry = self._fresh(f"marker.{name}")
        if entry is None or entry.sample.value != 1.0:
            return None
        return entry.sample.labels.get(LABEL_CONTENT, "")

    def reason(self, name: str) -> str | None:
        """Text a source attached to signal `name` (command monitors: first output line)."""
        entry = self._fresh(name)
        if entry is None:
            return None
        labels = entry.sample.labels
        return labels.get(LABEL_REASON, labels.get(LABEL_CONTENT))

    def events(self, since: float = 0.0, action: str | None = None) -> list[DockerEvent]:
        want = _normalise_action(action) if action else None
        with self._lock:
            return [
                e for e in self._events if e.ts >= since and (want is None or _matches(e, want))
            ]

    def snapshot(self) -> dict[str, float]:
        """Fresh values by name, for the health endpoint and `ferry status`."""
        with self._lock:
            now = self._clock.monotonic()
            return {
                n: e.sample.value
                for n, e in sorted(self._latest.items())
                if not self._is_stale(n, e, now)
            }

    @property
    def version(self) -> int:
        """Bumped on every change; pass it to `wait_changed` to never miss one."""
        with self._lock:
            return self._version

    # -- change notification ---------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(what)` on every change; returns a function that removes it.

        `what` is the signal name, "event.<action>" or "containers". Listeners
        run in the publishing thread and must not block.
        """
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    async def wait_changed(self, after: int | None = None, timeout: float | None = None) -> int:
        """Wait until the store's version exceeds `after` (default: the current one).

        Returns the new version, or the unchanged one on timeout. Passing the
        version you last evaluated at closes the race between evaluating and
        starting to wait.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if after is None:
                after = self._version
            if self._version > after:
                return self._version
            fut: asyncio.Future[int] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return self.version
        finally:
            with self._lock:
                self._waiters = [(lp, f) for lp, f in self._waiters if f is not fut]
            if not fut.done():
                fut.cancel()

    def _notify(self, what: str) -> None:
        with self._lock:
            version = self._version
            waiters, self._waiters = self._waiters, []
            listeners = list(self._listeners)
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut, version)
        for listener in listeners:
            try:
                listener(what)
            except Exception:
                log.exception("signals.listener_failed", what=what)

    # -- internals --------------------------------------------------------

    def _fresh(self, name: str) -> _Entry | None:
        with self._lock:
            entry = self._latest.get(name)
            if entry is None or self._is_stale(name, entry, self._clock.monotonic()):
                return None
            return entry

    def _is_stale(self, name: str, entry: _Entry, now: float) -> bool:
        max_age = self.max_age_for(name)
        return max_age is not None and now - entry.received > max_age

    def _prune_events_locked(self) -> None:
        cutoff = self._clock.time() - self._event_horizon
        while self._events and self._events[0].ts < cutoff:
            self._events.popleft()


def _resolve(fut: asyncio.Future[int], version: int) -> None:
    if not fut.done():
        fut.set_result(version)


def _normalise_action(action: str) -> str:
    base, sep, detail = action.partition(":")
    return f"{base.strip()}:{detail.strip()}" if sep else base.strip()


def _matches(event: DockerEvent, want: str) -> bool:
    if event.action == want:
        return True
    detail = event.attributes.get("action_detail")
    return detail is not None and f"{event.action}:{detail}" == want

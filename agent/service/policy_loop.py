"""The agent's heartbeat: evaluate the policies, follow drain transitions, tell systemd.

The watchdog ping lives in this loop on purpose: if evaluation hangs, systemd
stops hearing from us and restarts the agent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from agent.policy.engine import PolicyEngine
from agent.policy.models import MIGRATING_ACTIONS
from agent.service.drain import DrainMarker
from agent.service.evacuation import Evacuator
from agent.service.notify import Notifier
from agent.signals import SignalStore

log = structlog.get_logger(__name__)

TICK_SECONDS = 1.0


def shedding_load(engine: PolicyEngine | None, draining: bool) -> bool:
    """Overloaded: a migrating policy is active while the host is not draining."""
    if engine is None or draining:
        return False
    by_name = {p.name: p for p in engine.policies}
    # `active` includes cooling down: a host that just shed load should not
    # be handed containers again while its condition still holds.
    return any(
        s.active and (p := by_name.get(s.name)) is not None and p.action in MIGRATING_ACTIONS
        for s in engine.states()
    )


class PolicyLoop:
    """Ticks every second, and at once when a signal changes."""

    def __init__(
        self,
        engine: PolicyEngine,
        store: SignalStore,
        notifier: Notifier,
        drain: DrainMarker,
        evacuator: Evacuator,
        overloaded: Callable[[], bool],
    ) -> None:
        self._engine = engine
        self._store = store
        self._notifier = notifier
        self._drain = drain
        self._evacuator = evacuator
        self._overloaded = overloaded
        self._was_draining: bool | None = None  # None: log a drain already there at start
        self.status_line = ""

    async def run(self) -> None:
        interval = self._notifier.watchdog_interval
        last_ping = float("-inf")
        while True:
            # Read before the tick: a change during the tick must wake the next wait.
            version = self._store.version
            await self._engine.tick()
            self.check_drain_transition()
            self.update_status()
            now = time.monotonic()
            if interval is not None and now - last_ping >= interval:
                self._notifier.watchdog()
                last_ping = now
            await self._store.wait_changed(after=version, timeout=TICK_SECONDS)

    def check_drain_transition(self) -> None:
        """On undrain, stop retrying what could not be evacuated; the operator gave up on it."""
        draining = self._drain.active()
        if self._was_draining and not draining:
            dropped = self._evacuator.cancel(kind="evacuate")
            log.info("agent.undrained", stopped_retrying=dropped)
        elif draining and not self._was_draining:
            log.info("agent.draining", reason=self._drain.reason())
        self._was_draining = draining

    def update_status(self) -> None:
        """Send systemd a STATUS line, only when it changed (each one is a datagram)."""
        parts = []
        if self._drain.active():
            parts.append("draining")
        elif self._overloaded():
            parts.append("overloaded")
        else:
            parts.append("serving")
        active = [s.name for s in self._engine.states() if s.active]
        if active:
            parts.append(f"active: {', '.join(active)}")
        if self._evacuator.summary() != "idle":
            parts.append(self._evacuator.summary())
        line = "; ".join(parts)
        if line != self.status_line:
            self.status_line = line
            self._notifier.status(line)

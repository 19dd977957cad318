"""The fleet's disruption budget for drains.

With a fleet, `ferry drain` puts this host in the fleet's drain queue (a
lease-bound key; etcd's creation order is the queue order) and records the
request in a local file. Only while this host is among the first
`max_draining_hosts` of the queue is the drain marker set, and the marker is
what the policies evacuate on. A marker found without a place in the queue
(written by hand, or left from before a restart) becomes a request: the host
refuses incoming containers at once, and evacuates when its turn comes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.fleet.etcd import FleetUnavailable
from agent.fleet.fleet import Fleet
from agent.service.drain import DrainMarker

log = structlog.get_logger(__name__)

WAITING = "waiting"


class FleetDrain:
    def __init__(
        self,
        fleet: Fleet,
        marker: DrainMarker,
        request_path: Path,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._fleet = fleet
        self._marker = marker
        self._request = DrainMarker(request_path)
        self._on_change = on_change
        self._wake = asyncio.Event()

    def requested(self) -> bool:
        return self._request.active()

    def reason(self) -> str | None:
        return self._request.reason() or self._marker.reason()

    async def request(self, reason: str) -> dict[str, Any]:
        """Queue this host for draining. Raises FleetUnavailable: no request without etcd."""
        if not reason and self.requested():
            reason = self.reason() or ""  # asked again (e.g. `drain --wait`): keep the why
        await self._fleet.enqueue_drain(reason)
        await asyncio.to_thread(self._request.set, reason)
        await self.step()
        self._wake.set()
        return self.state()

    async def cancel(self) -> bool:
        """Leave the queue and stop draining; etcd's part is retried if etcd is down."""
        existed = await asyncio.to_thread(self._request.clear)
        existed = await asyncio.to_thread(self._marker.clear) or existed
        with contextlib.suppress(FleetUnavailable):
            await self._fleet.dequeue_drain()
        self._on_change()
        self._wake.set()
        return existed

    async def step(self) -> None:
        fleet = self._fleet
        if self._marker.active() and not self.requested():
            reason = self._marker.reason() or ""
            log.info("fleet.drain_marker_adopted", reason=reason)
            await asyncio.to_thread(self._request.set, reason)
        view, fresh = fleet.view, fleet.fresh()
        if not self.requested():
            if view is not None and fresh and fleet.name in view.queue:
                with contextlib.suppress(FleetUnavailable):
                    await fleet.dequeue_drain()
            return
        if view is not None and fresh and fleet.name not in view.queue:
            # The lease expired (agent restarted, etcd lost quorum too long): queue again.
            with contextlib.suppress(FleetUnavailable):
                await fleet.enqueue_drain(self.reason() or "")
        position, holders = fleet.drain_position()
        if position == "draining" and fresh:
            if not self._marker.active():
                log.info("fleet.drain_granted", budget=fleet.budget)
                await asyncio.to_thread(self._marker.set, self.reason() or "")
                self._on_change()
        elif fresh and self._marker.active():
            log.warning("fleet.drain_not_held", queued_behind=holders)
            await asyncio.to_thread(self._marker.clear)
            self._on_change()

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except FleetUnavailable as exc:
                log.warning("fleet.drain_step_failed", error=str(exc))
            except Exception:  # e.g. the marker's directory not writable: say so, go on
                log.exception("fleet.drain_step_failed")
            self._wake.clear()
            # Queued hosts look often, so the next one starts soon after a slot frees.
            wait = min(1.0, self._fleet.interval) if self.requested() else self._fleet.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if self.requested():
                with contextlib.suppress(FleetUnavailable):
                    await self._fleet.refresh()

    def gate(self) -> str | None:
        """Why an evacuation may not start now, or None. Only drains are gated.

        The reason starts with WAITING: the container is not stuck, its turn has
        not come (`ferry drain --wait` keeps waiting on it).
        """
        if not (self.requested() or self._marker.active()):
            return None
        position, holders = self._fleet.drain_position()
        if position == "draining":
            return None
        if not self._fleet.fresh():
            return f"{WAITING} for etcd: {self._fleet.stale_reason()}"
        return (
            f"{WAITING} for a drain slot: queued behind {', '.join(holders) or '?'} "
            f"(fleet.max_draining_hosts={self._fleet.budget})"
        )

    def state(self) -> dict[str, Any]:
        position, holders = self._fleet.drain_position()
        if self.requested() and position == "idle":
            position = "requested"
        return {
            "state": position,
            "queued_behind": holders,
            "reason": self.reason() if self.requested() else None,
            "max_draining_hosts": self._fleet.budget,
            "fresh": self._fleet.fresh(),
        }

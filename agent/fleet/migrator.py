"""Wraps the agent's migrator: reserve capacity on the target in etcd before anything
is frozen, and give it back when the migration ends, either way."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from agent.fleet.etcd import FleetUnavailable
from agent.fleet.fleet import Fleet, ReservationRefused
from agent.migration.errors import MigrationRefused
from agent.model import SPREAD_LABEL, ContainerInfo
from agent.service.evacuation import call_migrate

log = structlog.get_logger(__name__)

__all__ = ["SPREAD_LABEL", "FleetMigrator", "TargetRefused"]


class TargetRefused(MigrationRefused):
    """The fleet refused this target (draining, gone, full, a replica there, contended):
    the container is untouched and another target may well take it."""

    retarget = True


class FleetMigrator:
    def __init__(
        self,
        inner: Any,
        fleet: Fleet,
        inventory: Callable[[], Sequence[ContainerInfo]],
    ) -> None:
        self._inner = inner
        self._fleet = fleet
        self._inventory = inventory
        self._later: set[asyncio.Task[None]] = set()

    def _info(self, container: str) -> ContainerInfo | None:
        for c in self._inventory():
            if container in (c.name, c.id):
                return c
        return None

    async def migrate(self, container: str, target: str, progress: Any = None) -> Any:
        info = self._info(container)
        memory = max(info.memory_bytes, 0) if info is not None else 0
        spread = (info.labels.get(SPREAD_LABEL) or None) if info is not None else None
        mid = f"{self._fleet.name}.{uuid.uuid4().hex[:12]}"
        try:
            # The checkpoint is about the size of the memory it holds: stage that much disk.
            await self._fleet.reserve(target, mid, memory, memory, spread)
        except ReservationRefused as exc:
            # Let placement see what the transaction saw before it chooses again.
            with contextlib.suppress(FleetUnavailable):
                await self._fleet.refresh()
            raise TargetRefused(f"fleet reservation refused: {exc}") from None
        except FleetUnavailable as exc:
            raise MigrationRefused(f"fleet coordination unavailable, not starting: {exc}") from None
        log.info("fleet.reserved", container=container, target=target, reservation=mid)
        try:
            report = await call_migrate(self._inner, container, target, progress)
        except BaseException:
            await asyncio.shield(self._fleet.release(target, mid))
            raise
        self._release_when_reported(target, mid)
        return report

    def _release_when_reported(self, target: str, mid: str) -> None:
        """Keep the reservation until the target's own record counts the container,
        so no one sees its memory as free in between."""
        view = self._fleet.view
        member = view.members.get(target) if view is not None else None
        before = member.mod_revision if member is not None else 0

        async def later() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3 * self._fleet.interval + 1
            while loop.time() < deadline:
                current = self._fleet.view
                now = current.members.get(target) if current is not None else None
                if now is not None and now.mod_revision > before and current is not view:
                    break
                await asyncio.sleep(0.2)
            await self._fleet.release(target, mid)

        task = asyncio.ensure_future(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def close(self) -> None:
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

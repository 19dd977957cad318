"""The runtime's side of the migration engine: building it, and counting every migration.

The engine is built from the agent that owns it (config, Docker adapter,
clock, drain state), so `build_migration` takes that owner; tests and
embedders pass their own builder through `Overrides.migration`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.migration.errors import MigrationError, MigrationFailed
from agent.migration.report import MigrationReport
from agent.service.control import RouteHook
from agent.service.evacuation import call_migrate
from agent.service.metrics import FerryMetrics

log = structlog.get_logger(__name__)


@dataclass
class MigrationParts:
    """What the runtime needs from the migration engine, however it is built."""

    migrator: Any  # .migrate(container, target, progress=None) -> report
    handlers: Any  # agent.peer.api.PeerHandlers for the target side, or None
    journal: Any = None  # agent.journal.Journal
    route_hooks: list[RouteHook] = field(default_factory=list)
    reconcile: Callable[[], Awaitable[Any]] | None = None
    close: Callable[[], Awaitable[None] | None] | None = None


def build_migration(owner: Any) -> MigrationParts:
    """The runtime's MigrationParts for `ferry run` (an agent.service.runtime.Agent as owner).

    Uses the agent's own Docker adapter, clock and drain state; the control
    socket gets POST /v1/migrate. That route goes through the owner's metered
    migrator (set once the metrics exist, before the socket serves), so a
    `ferry migrate` is counted like a policy's migration.
    """
    # Imported here: the engine (and its TLS/aiohttp setup) only when the runtime builds one.
    from agent.journal import Journal
    from agent.migration.control_routes import add_migration_routes
    from agent.migration.factory import build_service

    journal = Journal(owner.config.state_dir)
    service = build_service(
        owner.config, journal, owner.draining, owner.clock, adapter=owner.docker
    )

    def pick(verdict: Any) -> str | None:
        evacuator = getattr(owner, "evacuator", None)
        return evacuator.pick_target(verdict) if evacuator is not None else None

    def routes(app: Any) -> None:
        migrator = getattr(owner, "migrator", None) or service
        add_migration_routes(app, migrator, check=service.check, pick=pick)

    async def close() -> None:
        await service.close()
        journal.close()

    return MigrationParts(
        migrator=service,
        handlers=service.handlers,
        journal=journal,
        route_hooks=[routes],
        reconcile=service.reconcile,
        close=close,
    )


class MeteredMigrator:
    """Counts every migration the evacuator starts, with the engine's `MigrationReport`."""

    def __init__(self, inner: Any, metrics: FerryMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def migrate(
        self, container: str, target: str, progress: Any = None, postcopy: bool = False
    ) -> Any:
        self._metrics.migration_started()
        try:
            if postcopy:
                report = await self._inner.migrate(
                    container, target, progress=progress, postcopy=True
                )
            else:
                report = await call_migrate(self._inner, container, target, progress)
        except asyncio.CancelledError:
            self._metrics.migration_failed(rolled_back=False)
            raise
        except Exception as exc:
            failed = exc if isinstance(exc, MigrationFailed) else None
            report = exc.report if isinstance(exc, MigrationError) else None
            self._metrics.migration_failed(
                rolled_back=bool(failed and failed.rolled_back),
                bytes_moved=report.bytes_moved if report is not None else None,
                state_lost=bool(failed and failed.state_lost),
            )
            raise
        if not isinstance(report, MigrationReport):
            # A stand-in engine (tests, embedders) that reports nothing to measure.
            self._metrics.migration_succeeded(None, None)
            return report
        pages_in = report.details.get("all_pages_in_s")
        self._metrics.migration_succeeded(
            report.downtime_s,
            report.bytes_moved,
            float(pages_in) if isinstance(pages_in, int | float) else None,
        )
        if report.state_lost:
            # Moved, but Docker restarted it from scratch on the target.
            self._metrics.migrations_state_lost.inc()
        return report

    async def resolve(self, migration_id: str, keep: str) -> str:
        result: str = await self._inner.resolve(migration_id, keep)
        return result

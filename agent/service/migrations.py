"""The runtime's side of the migration engine: building it, and counting every migration.

The engine is built from the agent that owns it (config, Docker adapter,
clock, drain state), so `build_migration` takes that owner; tests and
embedders pass their own builder through `Overrides.migration`.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

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


class MigrationUnavailable(Exception):
    """Raised by the stand-in migrator when no migration engine is installed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoMigrations:
    """Stand-in used when agent.migration is not importable: health works, moves are refused."""

    def migrate(self, container: str, target: str, progress: Any = None) -> Any:
        raise MigrationUnavailable("the migration engine (agent.migration) is not installed")

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        from agent.peer.api import HandlerError

        raise HandlerError(503, "unavailable", "this agent has no migration engine")

    def __getattr__(self, name: str) -> Any:
        async def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
            from agent.peer.api import HandlerError

            raise HandlerError(503, "unavailable", "this agent has no migration engine")

        return refuse


def build_migration(owner: Any) -> MigrationParts:
    from agent.journal import Journal

    journal = Journal(owner.config.state_dir)
    if importlib.util.find_spec("agent.migration") is None:
        log.warning("agent.migration_engine_missing")
        stand_in = _NoMigrations()
        return MigrationParts(stand_in, stand_in, journal, close=journal.close)
    from agent.migration.factory import runtime_parts

    parts: MigrationParts = runtime_parts(owner, journal)
    return parts


def _report_number(report: Any, *names: str) -> float | None:
    for name in names:
        value = report.get(name) if isinstance(report, dict) else getattr(report, name, None)
        if isinstance(value, int | float):
            return float(value)
    return None


class MeteredMigrator:
    """Counts every migration the evacuator starts, whatever the engine's report looks like."""

    def __init__(self, inner: Any, metrics: FerryMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def migrate(self, container: str, target: str, progress: Any = None) -> Any:
        self._metrics.migration_started()
        try:
            report = await call_migrate(self._inner, container, target, progress)
        except asyncio.CancelledError:
            self._metrics.migration_failed(rolled_back=False)
            raise
        except Exception as exc:
            report = getattr(exc, "report", None)
            moved = _report_number(report, "bytes_moved") if report is not None else None
            self._metrics.migration_failed(
                rolled_back=bool(getattr(exc, "rolled_back", False)),
                bytes_moved=int(moved) if moved is not None else None,
            )
            raise
        downtime = _report_number(report, "downtime_s", "downtime_seconds", "downtime")
        moved = _report_number(report, "bytes_sent", "bytes_moved", "bytes_total", "bytes")
        self._metrics.migration_succeeded(downtime, int(moved) if moved is not None else None)
        return report

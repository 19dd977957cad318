"""Build the engine from the agent's config: Docker adapter, peer clients over mTLS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter
from agent.journal import Journal
from agent.migration.source import MigrationService
from agent.model import Clock, SystemClock
from agent.peer.client import PeerClient, PeerTimeouts
from agent.peer.tls import client_context


def build_service(
    config: FerryConfig,
    journal: Journal,
    draining: Callable[[], bool] = lambda: False,
    clock: Clock | None = None,
    adapter: DockerAdapter | None = None,
) -> MigrationService:
    """The MigrationService for `ferry run`. Close it with `await service.close()`."""
    assert config.tls.ca and config.tls.cert and config.tls.key  # filled by FerryConfig
    ssl_ctx = client_context(config.tls.ca, config.tls.cert, config.tls.key)
    # Uploads are bounded by progress (idle), not by a total: a GiB of state takes a while.
    timeouts = PeerTimeouts(connect=5.0, request=60.0, upload=None, idle=120.0)
    peers = {p.name: PeerClient(p.name, p.address, ssl_ctx, timeouts) for p in config.peers}
    service = MigrationService(
        adapter or DockerAdapter(config.docker.url),
        config,
        journal,
        peers,
        draining,
        clock or SystemClock(),
    )
    service.owns_adapter = adapter is None
    return service


def runtime_parts(owner: Any, journal: Journal) -> Any:
    """The runtime's MigrationParts for `ferry run` (an agent.service.runtime.Agent as owner).

    Uses the agent's own Docker adapter, clock and drain state; the control
    socket gets POST /v1/migrate. That route goes through the owner's metered
    migrator (set once the metrics exist, before the socket serves), so a
    `ferry migrate` is counted like a policy's migration.
    """
    from agent.migration.control_routes import add_migration_routes
    from agent.service.migrations import MigrationParts

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

"""Build the engine from the agent's config: Docker adapter, peer clients over mTLS."""

from __future__ import annotations

from collections.abc import Callable

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

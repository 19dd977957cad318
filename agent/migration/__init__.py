"""The migration engine: move a running container to a peer with CRIU, or leave it running here.

Public API:
  MigrationService(adapter, config, journal, peers, draining, clock)
    .migrate(container, target, progress) -> MigrationReport
    .reconcile()                      resolve unfinished migrations at start
    .handlers                         TargetHandlers, the peer server's PeerHandlers
  build_service(config, journal, draining, clock)   the real thing, from config
  add_migration_routes(app, service)  POST /v1/migrate on the control socket
"""

from agent.migration.errors import MigrationError, MigrationFailed, MigrationRefused
from agent.migration.report import MigrationReport, ProgressEvent
from agent.migration.source import MigrationService
from agent.migration.target import TargetHandlers

__all__ = [
    "MigrationError",
    "MigrationFailed",
    "MigrationRefused",
    "MigrationReport",
    "MigrationService",
    "ProgressEvent",
    "TargetHandlers",
    "add_migration_routes",
    "build_service",
]


def __getattr__(name: str) -> object:
    # Imported lazily: they pull in aiohttp/TLS setup the engine itself does not need.
    if name == "add_migration_routes":
        from agent.migration.control_routes import add_migration_routes

        return add_migration_routes
    if name == "build_service":
        from agent.migration.factory import build_service

        return build_service
    raise AttributeError(name)

"""The peer API contract shared by server and client: routes, headers, handler Protocol, errors.

A source agent drives a migration on a target agent through these calls:

  GET  /v1/health                  -> health()
  POST /v1/check                   -> check(peer, body)         would you take it? (dry run)
  POST /v1/migrations              -> prepare(peer, body)       can you take it? reserve
  GET  /v1/migrations/{id}         -> status(peer, id)
  POST /v1/migrations/{id}/stage   -> stage(peer, id, body)     create the target container
  PUT  /v1/migrations/{id}/image   -> receive_image(peer, id, stream, meta)
  PUT  /v1/migrations/{id}/state   -> receive_state(peer, id, stream, digest or None)
  POST /v1/migrations/{id}/restore -> restore(peer, id, body)     restore, held stopped
  POST /v1/migrations/{id}/commit  -> commit(peer, id, body)      the source committed: run it
  POST /v1/migrations/{id}/abort   -> abort(peer, id, body)

`peer` is the caller's authenticated name (from its client certificate), never
something the caller merely claims in a body. Every JSON answer is an object;
errors are {"error": code, "reason": text} with a matching HTTP status.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

API_PREFIX = "/v1"
HEALTH_PATH = f"{API_PREFIX}/health"
MIGRATIONS_PATH = f"{API_PREFIX}/migrations"
CHECK_PATH = f"{API_PREFIX}/check"

# Digest of the state stream as sent, "blake3:<hex>" (older agents: "sha256:<hex>"),
# when known before sending.
DIGEST_HEADER = "X-Ferry-Digest"
# Optional metadata for an image upload (JSON object), e.g. {"image": "redis:7", "id": "sha256:.."}.
META_HEADER = "X-Ferry-Meta"

_MIGRATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def migration_path(migration_id: str, action: str | None = None) -> str:
    if not _MIGRATION_ID_RE.match(migration_id):
        raise ValueError(f"invalid migration id {migration_id!r}")
    base = f"{MIGRATIONS_PATH}/{migration_id}"
    return f"{base}/{action}" if action else base


def valid_migration_id(migration_id: str) -> bool:
    return bool(_MIGRATION_ID_RE.match(migration_id))


class HandlerError(Exception):
    """Raised by a handler to answer with a specific error.

    E.g. HandlerError(409, "busy", "already receiving 2 migrations") or
    HandlerError(404, "unknown_migration", "no migration abc").
    """

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.status = status
        self.error = error
        self.reason = reason


class BodyTooLarge(Exception):
    """An upload exceeded the server's limit; the request is answered with 413."""


class ByteStream(Protocol):
    """An upload body being received. Iterate it for chunks; it enforces the size limit."""

    @property
    def bytes_read(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...


class PeerHandlers(Protocol):
    """What the migration engine implements for the target side of the peer API.

    Return JSON-able dicts. Raise HandlerError for a refusal with a reason; let
    BodyTooLarge from a stream propagate. Any other exception becomes a 500.
    """

    async def health(self) -> dict[str, Any]:
        """Keys matching agent.model.PeerHealth fields (draining, overloaded, load1, ...)."""
        ...

    async def check(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """Would prepare accept this now? {"reasons", "transient", "has_image"}."""
        ...

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def status(self, peer: str, migration_id: str) -> dict[str, Any]: ...

    async def stage(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def receive_image(
        self, peer: str, migration_id: str, stream: ByteStream, meta: dict[str, Any]
    ) -> dict[str, Any]: ...

    async def receive_state(
        self, peer: str, migration_id: str, stream: ByteStream, digest: str | None
    ) -> dict[str, Any]:
        """`digest` is None when the source streams an archive it is still building;
        it then sends the digest with the restore call, and the target must check
        it against what it received before anything it unpacked becomes visible."""
        ...

    async def restore(
        self, peer: str, migration_id: str, body: dict[str, Any]
    ) -> dict[str, Any]: ...

    async def commit(
        self, peer: str, migration_id: str, body: dict[str, Any]
    ) -> dict[str, Any]: ...

    async def abort(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]: ...

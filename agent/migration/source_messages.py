"""What the source tells a target about a migration's outcome: commit and abort, until heard.

A commit is retried for a bounded patience; the answer says whether the target
runs the copy, proves it holds none, or stayed silent (`IN_DOUBT`). An abort
that goes unheard is retried in the background: until the target hears it, it
holds a half-made copy and one of its incoming slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from agent.backoff import Backoff
from agent.model import Clock
from agent.peer.api import migration_path
from agent.peer.client import PeerError, PeerRefused, PeerUnavailable

log = structlog.get_logger(__name__)

IN_DOUBT = object()  # send_commit: the target stayed silent


class PeerLike(Protocol):
    """The part of agent.peer.client.PeerClient the engine uses."""

    name: str

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]: ...

    async def get_json(self, path: str, *, timeout: float | None = None) -> dict[str, Any]: ...

    async def upload_state(
        self, migration_id: str, chunks: Any, digest: str | None = None
    ) -> dict[str, Any]: ...

    async def upload_image(
        self, migration_id: str, chunks: Any, meta: dict[str, Any]
    ) -> dict[str, Any]: ...


class PeerMessages:
    def __init__(
        self,
        clock: Clock,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        abort_retry_for: float,
    ) -> None:
        self.clock = clock
        self.spawn = spawn  # background tasks the service owns (and cancels at close)
        # After this long the target drops an unheard migration itself.
        self.abort_retry_for = abort_retry_for

    async def send_commit(self, peer: PeerLike | None, mid: str, patience: float) -> Any:
        """Tell the target to run its held copy, retrying for `patience` seconds.

        Returns the target's answer; None when the target proves it holds no
        copy (then this side may restore its own); IN_DOUBT when it stayed silent.
        """
        if peer is None:
            return IN_DOUBT
        deadline = self.clock.monotonic() + patience
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                answer: dict[str, Any] = await peer.post_json(
                    migration_path(mid, "commit"), {}, timeout=max(5.0, min(30.0, patience))
                )
                return answer
            except PeerRefused as exc:
                if exc.error in ("not_held", "unknown_migration"):
                    log.warning("migration.target_holds_nothing", migration=mid, reason=exc.reason)
                    return None
                log.warning("migration.commit_refused", migration=mid, error=str(exc))
            except PeerUnavailable as exc:
                log.warning("migration.commit_unanswered", migration=mid, error=str(exc))
            delay = backoff.next()
            if self.clock.monotonic() + delay > deadline:
                return IN_DOUBT
            await asyncio.sleep(delay)

    async def confirmed_abort(self, peer: PeerLike | None, mid: str, reason: str) -> bool:
        """Abort, and say whether the target confirmed its copy is gone."""
        if peer is None:
            return False
        try:
            await peer.post_json(migration_path(mid, "abort"), {"reason": reason})
            return True
        except PeerRefused as exc:
            return exc.error in ("unknown_migration",)
        except PeerError:
            return False

    async def send_abort(self, peer: PeerLike | None, mid: str, reason: str) -> bool:
        """Abort; True if the target says the container already runs there."""
        if peer is None:
            return False
        try:
            await peer.post_json(migration_path(mid, "abort"), {"reason": reason})
        except PeerRefused as exc:
            if exc.error == "already_running":
                return True
            log.warning("migration.abort_refused", migration=mid, error=str(exc))
        except PeerError as exc:
            # Until the target hears it, it holds a half-made copy (and one of its
            # incoming slots) for its reservation's lifetime: keep telling it.
            log.warning("migration.abort_unanswered", migration=mid, error=str(exc))
            self.spawn(self._abort_until_heard(peer, mid, reason))
        return False

    async def _abort_until_heard(self, peer: PeerLike, mid: str, reason: str) -> None:
        delay = 1.0
        deadline = self.clock.monotonic() + self.abort_retry_for
        while self.clock.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
            try:
                await peer.post_json(migration_path(mid, "abort"), {"reason": reason})
            except PeerUnavailable:
                continue
            except PeerError as exc:
                log.warning("migration.abort_refused", migration=mid, error=str(exc))
                return
            log.info("migration.abort_delivered", migration=mid)
            return

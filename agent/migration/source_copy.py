"""The moved container's copy on the source: removed once the target runs it, or kept a while.

With `migration.keep_source_copy_for` the stopped copy is renamed and removed
later (killed first when the runc checkpointer left it frozen, so its kernel
ends the clients' old connections now). A removal that fails while dockerd is
away is retried in the background and again at the agent's next start: left
alone it would hold a second copy of the state for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.journal import Journal
from agent.model import Clock

log = structlog.get_logger(__name__)

RETRY_MAX = 30.0  # seconds between removal attempts, at most


class SourceCopies:
    def __init__(
        self,
        adapter: DockerAdapter,
        journal: Journal,
        clock: Clock,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.adapter = adapter
        self.journal = journal
        self.clock = clock
        self.spawn = spawn

    async def dispose(
        self, container_id: str, name: str, mid: str, keep: float, frozen_in_place: bool
    ) -> tuple[str, float | None]:
        """Remove (or keep for `keep` seconds) the source copy; returns how, and until when."""
        try:
            if frozen_in_place and keep > 0:
                # Killed, not kept frozen: its kernel then ends the clients' old
                # connections now instead of leaving them to their timeouts.
                await asyncio.to_thread(self.adapter.kill, container_id)
            if keep > 0:
                kept = f"{name}-ferry-{mid}"
                await asyncio.to_thread(self.adapter.rename, container_id, kept)
                self.remove_until_gone(container_id, delay=keep)
                return f"kept as {kept} for {keep:.0f}s", self.clock.time() + keep
            await asyncio.to_thread(self.adapter.remove, container_id, True)
        except DockerNotFound:
            return "removed", None
        except DockerError as exc:
            # It runs on the target: this copy (stopped, policy "no") must still go, and
            # will once dockerd answers again (or at the agent's next start).
            log.warning("migration.source_cleanup_failed", migration=mid, error=str(exc))
            self.remove_until_gone(container_id)
            return f"cleanup failed, retrying in the background: {exc}", None
        return "removed", None

    def remove_until_gone(self, container_id: str, delay: float = 0.0) -> None:
        """Remove the source's stopped copy (and its checkpoint with it), retrying while
        its daemon is away."""

        async def later() -> None:
            await asyncio.sleep(delay)
            wait = 1.0
            while True:
                try:
                    await asyncio.to_thread(self.adapter.remove, container_id, True)
                    return
                except DockerNotFound:
                    return
                except DockerError as exc:
                    log.warning(
                        "migration.source_cleanup_retry", container=container_id, error=str(exc)
                    )
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)

        self.spawn(later())

    async def sweep(self) -> None:
        """Source copies of migrations that succeeded but could not be removed then."""
        records = await asyncio.to_thread(self.journal.history, 200)
        for rec in records:
            if rec.role != "source" or rec.outcome != "succeeded":
                continue
            try:
                info = await asyncio.to_thread(self.adapter.find_container, rec.container_id)
                if info is not None and not (info.get("State") or {}).get("Running"):
                    await asyncio.to_thread(self.adapter.remove, rec.container_id, True)
                    log.info("migration.source_cleanup_done", migration=rec.id)
            except DockerError as exc:
                log.warning("migration.source_cleanup_failed", migration=rec.id, error=str(exc))

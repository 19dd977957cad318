"""One outgoing migration's state, and the source's wait for a post-copy target's pages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from agent.migration import postcopy
from agent.migration import report as rp
from agent.migration.errors import MigrationFailed
from agent.migration.report import MigrationReport, PhaseTimer
from agent.migration.source_messages import PeerLike
from agent.migration.spec import ContainerSpec
from agent.model import Clock
from agent.peer.api import migration_path
from agent.peer.client import PeerError


class Run:
    """State of one outgoing migration."""

    def __init__(
        self, mid: str, spec: ContainerSpec, peer: PeerLike, report: MigrationReport, clock: Clock
    ) -> None:
        self.mid = mid
        self.spec = spec
        self.peer = peer
        self.report = report
        self.timer = PhaseTimer(report, clock)
        self.checkpoint = f"ferry-{mid}"
        self.frozen_at: float | None = None
        self.staged = False
        self.restore_sent = False
        self.frozen_ok = False  # the checkpointer returned: the images are whole
        self.group_id: str | None = None  # the lead member's migration id
        self.decision: str | None = None
        self.held_at: float | None = None  # monotonic: the target's copy restored
        self.filling = False  # committed while the target still fills pages in
        self.last_emit = float("-inf")  # monotonic: the last rate-limited progress line
        self.postcopy = False
        self.pagedump: postcopy.PageServerDump | None = None


async def await_pages(
    run: Run,
    dump: postcopy.PageServerDump,
    emit: Callable[..., None],
    *,
    stall: float,
    clock: Clock,
    serving: dict[str, dict[str, Any]],
    mark_in_doubt: Callable[[Run, str], Awaitable[None]],
) -> None:
    """Until the target has every page: any failure raises (and so rolls back)."""
    served, last_progress, asked_at = -1, clock.monotonic(), 0.0
    exited_at: float | None = None
    while True:
        now = clock.monotonic()
        rc = dump.poll()
        if rc is not None and rc != 0:
            raise MigrationFailed(f"the source's page server failed: {dump.error_words()}")
        if rc == 0 and exited_at is None:
            exited_at = now
        if now - asked_at >= 0.5:
            asked_at = now
            try:
                st: dict[str, Any] | None = await run.peer.get_json(
                    migration_path(run.mid), timeout=2.0
                )
            except PeerError:
                st = None
            pc = (st or {}).get("postcopy") or {}
            # CRIU sends pages with splice (no write counters): the target counts them.
            pulled = int(pc.get("bytes_pulled") or 0)
            total = int(pc.get("bytes_total") or 0) or None
            serving[run.mid] = {
                "container": run.spec.name,
                "how": "post-copy",
                "bytes_done": pulled,
                "bytes_total": total or 0,
            }
            if pulled != served:
                served, last_progress = pulled, clock.monotonic()
                emit(rp.POSTCOPY, "pulling pages", served, total)
            if pc.get("failed") or (st or {}).get("outcome") == "aborted":
                raise MigrationFailed(
                    f"{run.peer.name}: {pc.get('failed') or (st or {}).get('reason')}"
                )
            if pc.get("pages_in"):
                run.report.details["pages_served_bytes"] = served
                return
        if exited_at is not None and now - exited_at > stall:
            # Every page went out, but the target never said it has them: nobody can
            # tell which copy is whole. Stay paused, keep everything: in doubt.
            why = (
                f"the page server finished but {run.peer.name} did not confirm every page "
                f"within {stall:.0f}s; the source stays paused with its state"
            )
            run.decision = rp.DECISION_COMMIT
            await mark_in_doubt(run, why)
            raise MigrationFailed(why, in_doubt=True)
        if exited_at is None and now - last_progress > stall:
            raise MigrationFailed(
                f"no page moved for {stall:.0f}s (migration.postcopy_stall_timeout)"
            )
        await asyncio.sleep(0.2)

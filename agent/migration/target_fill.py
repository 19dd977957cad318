"""The target's lazy fills: a copy restored lazily runs only while its daemon is healthy.

A local lazy restore leaves the copy's memory pages to a `criu lazy-pages`
daemon reading the full images on this host's disk. Until that daemon exits 0
nothing else holds those pages in the copy: a daemon that fails means the copy
is killed and restored again from the same images (continued again if it had
been committed). The full images are the durable mark of a fill not yet
confirmed, so an agent that restarts finds every such copy and does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError
from agent.journal import Journal, JournalError
from agent.migration.criu_config import CRIU_DIR
from agent.migration.incoming import Incoming, incoming_from_record, lazy_bytes
from agent.migration.lazy_restore import LazyRestore, LazyRestoreError
from agent.migration.paths import DataRootResolver
from agent.model import Clock

log = structlog.get_logger(__name__)

FILL_POLL = 0.05  # how often a fill's daemon is looked at: a dead one is acted on this fast
FILL_RETRIES = 2  # restores from the local images after the first daemon failure
FILLED_KEPT = 256  # finished fills remembered for status calls soon after; not a history


@dataclass
class Fill:
    """A lazy restore whose daemon is still filling pages in."""

    lazy: LazyRestore
    inc: Incoming
    since: float  # monotonic: the copy restored (held) by this attempt
    attempts: int = 0
    pages_in: bool = False
    took: float | None = None  # held -> every page in
    failed: str | None = None


@dataclass
class CopyActions:
    """What a fill does to the copy, through the target that owns it."""

    lock: Callable[[str], asyncio.Lock]  # the migration's lock
    lazy: Callable[[Incoming], LazyRestore]
    restore_once: Callable[[Incoming], None]  # restore held, and prove nothing runs
    continue_copy: Callable[[Incoming], None]
    after_commit: Callable[[Incoming], str | None]


class LazyFills:
    """Every fill of this target, its watch, and its retries."""

    def __init__(
        self,
        config: FerryConfig,
        journal: Journal,
        adapter: DockerAdapter,
        data_root: DataRootResolver,
        clock: Clock,
        copy: CopyActions,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.config = config
        self.journal = journal
        self.adapter = adapter
        self.data_root = data_root
        self.clock = clock
        self.copy = copy
        self.spawn = spawn  # the target's tasks: cancelled when it closes
        self.active: dict[str, Fill] = {}
        self.filled: dict[str, float] = {}  # migration -> seconds from held to the last page

    def track(self, lazy: LazyRestore, inc: Incoming, since: float) -> None:
        self.active[inc.migration_id] = Fill(lazy, inc, since)

    def watch(self, mid: str) -> None:
        if mid not in self.active:
            return
        self.spawn(self._watch(mid))

    def pending(self, mid: str) -> bool:
        fill = self.active.get(mid)
        return fill is not None and not fill.pages_in

    def drop(self, mid: str) -> None:
        self.active.pop(mid, None)  # its watcher sees that and stops

    def status(self, mid: str) -> dict[str, Any] | None:
        fill = self.active.get(mid)
        if fill is not None:
            return {"pending": not fill.pages_in, "failed": fill.failed, **self._bytes(fill)}
        if mid in self.filled:
            return {"pending": False, "pages_in_s": self.filled[mid]}
        return None

    def progress(self) -> dict[str, dict[str, Any]]:
        return {
            mid: {"container": fill.inc.name, "how": "lazy fill", **self._bytes(fill)}
            for mid, fill in list(self.active.items())
            if not fill.pages_in
        }

    def _bytes(self, fill: Fill) -> dict[str, int]:
        total = lazy_bytes(fill.inc.timings)
        done = total if fill.pages_in else fill.lazy.pulled()
        return {"bytes_done": min(done, total) if total else done, "bytes_total": total}

    def _committed(self, mid: str) -> bool:
        try:
            return bool(self.journal.get(mid).outcome == "succeeded")
        except JournalError:
            return False

    def _refill(self, inc: Incoming, lazy: LazyRestore, continued: bool) -> None:
        """Kill whatever copy there is and restore it again from the local images."""
        assert inc.container_id
        lazy.stop_daemon()
        with contextlib.suppress(DockerError):
            self.adapter.kill(inc.container_id)
        lazy.start_daemon()
        self.copy.restore_once(inc)
        if continued:
            self.copy.continue_copy(inc)

    async def ensure(self, inc: Incoming, continued: bool) -> None:
        """A lazy copy whose fill nobody here watches (the agent restarted): its daemon may
        have died with pages missing, so restore it again before it may run. Under the
        migration's lock."""
        mid = inc.migration_id
        if mid in self.active:
            failed = self.active[mid].failed
            if failed:
                raise LazyRestoreError(f"its pages could not be filled in: {failed}")
            return
        if not inc.container_id:
            return
        lazy = self.copy.lazy(inc)
        if not await asyncio.to_thread(lambda: lazy.pending):
            return
        log.warning("migration.target.refill", migration=mid, continued=continued)
        await asyncio.to_thread(self._refill, inc, lazy, continued)
        self.active[mid] = Fill(lazy, inc, self.clock.monotonic())
        self.watch(mid)

    async def refill_if_unconfirmed(self, inc: Incoming) -> bool:
        """After a restart: a committed lazy copy whose last page was never confirmed is
        restored again from the local images and continued (its memory is then right)."""
        async with self.copy.lock(inc.migration_id):
            before = inc.migration_id in self.active
            await self.ensure(inc, continued=True)
            return not before and inc.migration_id in self.active

    async def reconcile(self) -> list[str]:
        """At agent start: every committed lazy restore still holding its full images."""
        root = await asyncio.to_thread(self.data_root.get)
        base = root.local_root.joinpath(*CRIU_DIR)
        found = await asyncio.to_thread(
            lambda: (
                sorted(p.name[: -len(".images")] for p in base.glob("*.images"))
                if base.is_dir()
                else []
            )
        )
        done = []
        for mid in found:
            try:
                rec = self.journal.get(mid)
            except JournalError:
                log.warning("migration.target.unknown_images", migration=mid, dir=str(base))
                continue
            if rec.role != "target" or rec.outcome != "succeeded":
                continue  # unfinished ones are reconcile_record's; others' images go there
            inc = incoming_from_record(rec)
            try:
                if await self.refill_if_unconfirmed(inc):
                    done.append(mid)
            except (DockerError, LazyRestoreError) as exc:
                log.error(
                    "migration.target.refill_failed",
                    migration=mid,
                    error=str(exc),
                    state=str(base / f"{mid}.images"),
                )
        return done

    async def _watch(self, mid: str) -> None:
        """Until the daemon reports every page in, the copy runs only while it is healthy."""
        fill = self.active.get(mid)
        timeout = float(self.config.migration.restore_timeout)
        while fill is not None and self.active.get(mid) is fill:
            code = fill.lazy.poll()
            if code is None and self.clock.monotonic() - fill.since <= timeout:
                await asyncio.sleep(FILL_POLL)
                continue
            if code == 0:
                await self._done(mid, fill)
                return
            why = (
                f"criu lazy-pages exited {code}: {fill.lazy.tail()}"
                if code is not None
                else f"not every page was in after {timeout:.0f}s"
            )
            async with self.copy.lock(mid):
                if self.active.get(mid) is not fill:
                    return
                await self._failed(mid, fill, why)

    async def _done(self, mid: str, fill: Fill) -> None:
        async with self.copy.lock(mid):
            if self.active.get(mid) is not fill:
                return
            fill.took = round(self.clock.monotonic() - fill.since, 4)
            log.info("migration.target.pages_in", migration=mid, seconds=fill.took)
            if not self._committed(mid):
                fill.pages_in = True
                return  # the commit finishes the clean-up
            await asyncio.to_thread(self.copy.after_commit, fill.inc)
            fill.pages_in = True
            self.finished(mid)

    def finished(self, mid: str) -> None:
        fill = self.active.pop(mid, None)
        if fill is not None and fill.took is not None:
            self.filled[mid] = fill.took
            while len(self.filled) > FILLED_KEPT:
                self.filled.pop(next(iter(self.filled)))

    async def _failed(self, mid: str, fill: Fill, why: str) -> None:
        committed = self._committed(mid)
        fill.attempts += 1
        log.error(
            "migration.target.lazy_failed",
            migration=mid,
            attempt=fill.attempts,
            running=committed,
            error=why,
        )
        if fill.attempts <= FILL_RETRIES:
            try:
                await asyncio.to_thread(self._refill, fill.inc, fill.lazy, committed)
                fill.since = self.clock.monotonic()
                return
            except (DockerError, LazyRestoreError) as exc:
                why = str(exc)
        fill.failed = why
        fill.lazy.stop_daemon()
        with contextlib.suppress(DockerError):
            if fill.inc.container_id:
                await asyncio.to_thread(self.adapter.kill, fill.inc.container_id)
        if committed:
            # Nothing runs; every byte stays on disk for the next agent start to restore.
            self.active.pop(mid, None)
            log.error(
                "migration.target.fill_gave_up",
                migration=mid,
                reason=why,
                state=str(fill.lazy.full_dir),
                next="restored again from these images when the agent restarts",
            )

"""The target's silence check: drop a migration whose source went quiet before any hold.

Until a copy is held here the source cannot have committed, so a migration
it has stopped talking about may be dropped. The target asks first: a source
still dumping or sending says its migration is on. One that cannot be reached,
or that has ended it, gets nothing restored here any more, and the half-made
container and its reservation go. Timers, not tasks: nothing waits while no
check is due.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from agent.journal import Journal, JournalError
from agent.migration.incoming import Incoming
from agent.migration.resources import Reservations
from agent.model import Clock

log = structlog.get_logger(__name__)

# How long a source may say nothing (no request) before the target asks it whether
# the migration is still on; a dump of a big container sends nothing for a while.
QUIET_LIMIT = 120.0


class SilenceCheck:
    def __init__(
        self,
        *,
        incoming: dict[str, Incoming],
        journal: Journal,
        locks: dict[str, asyncio.Lock],
        reservations: Reservations,
        reservation_ttl: float,
        droppable: tuple[str, ...],
        peer_status: Callable[[str, str], Awaitable[dict[str, Any] | None]] | None,
        discard: Callable[[Incoming, str], Awaitable[Any]],
        clock: Clock,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.incoming = incoming
        self.journal = journal
        self.locks = locks
        self.reservations = reservations
        self.reservation_ttl = reservation_ttl
        self.droppable = droppable  # phases before any copy is held here
        self.peer_status = peer_status
        self.discard = discard
        self.clock = clock
        self.spawn = spawn  # the target's tasks: cancelled when it closes
        self.limit = QUIET_LIMIT
        self.timers: dict[str, asyncio.TimerHandle] = {}

    def arm(self, mid: str, delay: float | None = None) -> None:
        self.disarm(mid)
        wait = self.limit if delay is None else delay
        self.timers[mid] = asyncio.get_running_loop().call_later(wait, self._due, mid)

    def disarm(self, mid: str) -> None:
        timer = self.timers.pop(mid, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()

    def _due(self, mid: str) -> None:
        self.timers.pop(mid, None)
        if mid in self.incoming:
            self.spawn(self._check_or_again(mid))

    async def _check_or_again(self, mid: str) -> None:
        # The only clean-up of an abandoned migration short of a restart: a check
        # that fails unexpectedly is logged and tried again, never silently lost.
        try:
            await self.check(mid)
        except Exception as exc:
            log.error("migration.target.silence_check_failed", migration=mid, error=repr(exc))
            if mid in self.incoming and mid not in self.timers:
                self.arm(mid)

    def _phase_of(self, mid: str) -> str | None:
        with contextlib.suppress(JournalError):
            rec = self.journal.get(mid)
            return rec.phase if rec.outcome is None else None
        return None

    async def check(self, mid: str) -> None:
        """Drop the migration if its source went silent before a copy was held here."""
        inc = self.incoming.get(mid)
        if inc is None or self._phase_of(mid) not in self.droppable:
            return  # held or pulling its pages (the source decides), or ended: the timer stops
        heard = inc.last_heard
        quiet = self.clock.monotonic() - heard
        lock = self.locks.get(mid)
        busy = lock is not None and lock.locked()
        if busy or quiet < self.limit:
            # A request (an upload) is running, or the source spoke since the timer was set.
            if busy:  # an upload longer than the reservation keeps its room
                self.reservations.extend(mid, self.reservation_ttl)
            self.arm(mid, max(self.limit - quiet, self.limit / 4))
            return
        verdict = await self.peer_status(inc.peer, mid) if self.peer_status else None
        if verdict is not None and verdict.get("outcome") is None:
            # Still on (a long dump, a group waiting for its members): its room stays held.
            inc.last_heard = self.clock.monotonic()
            self.reservations.extend(mid, self.reservation_ttl)
            self.arm(mid)
            return
        async with self.locks.setdefault(mid, asyncio.Lock()):
            if self.incoming.get(mid) is not inc or self._phase_of(mid) not in self.droppable:
                return
            if inc.last_heard != heard:
                self.arm(mid)  # the source spoke while we asked
                return
            why = (
                "cannot be reached"
                if verdict is None
                else f"has ended it ({verdict.get('outcome')})"
            )
            reason = (
                f"the source {inc.peer} sent nothing for {quiet:.0f}s and {why}; "
                "it was never told of a restored copy here, so none is kept"
            )
            log.warning("migration.target.source_silent", migration=mid, reason=reason)
            await self.discard(inc, reason)

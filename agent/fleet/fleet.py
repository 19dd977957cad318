"""One agent's membership in the fleet: its lease, its record, its view of the others,
its drain request, and the capacity it reserves on targets.

Every agent holds one etcd lease, renewed every `lease_ttl / 3`. Its record,
its drain request and the reservations it holds are bound to that lease, so an
agent that dies or is cut off leaves the fleet, the drain queue and its targets
by itself once the lease expires. Reads are linearizable (etcd's default): a
member without quorum cannot answer them, so a view is either current or
marked stale, never silently old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from collections.abc import Callable
from typing import Any

import structlog

from agent.fleet.etcd import (
    Etcd,
    FleetUnavailable,
    cmp_create,
    cmp_mod,
    op_delete,
    op_put,
    op_range,
    op_range_prefix,
)
from agent.fleet.view import FleetView, Keys, decode
from agent.model import Clock, SystemClock

log = structlog.get_logger(__name__)

# Like the target's own admission check: leave room for what a process grows into.
HEADROOM = 0.1


class ReservationRefused(Exception):
    """The target cannot take this container now: draining, gone, full, or a replica there."""


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


class Fleet:
    def __init__(
        self,
        etcd: Etcd,
        *,
        name: str,
        address: str,
        prefix: str,
        lease_ttl: float,
        max_draining_hosts: int,
        labels: dict[str, str] | None = None,
        version: str = "",
        local: Callable[[], dict[str, Any]] = dict,
        clock: Clock | None = None,
    ) -> None:
        self.etcd = etcd
        self.name = name
        self.address = address
        self.keys = Keys(prefix)
        self.ttl = lease_ttl
        self.budget = max_draining_hosts
        self.labels = dict(labels or {})
        self.version = version
        self._local = local
        self._clock = clock or SystemClock()
        self.interval = max(lease_ttl / 3, 0.5)
        self.lease = 0
        self.view: FleetView | None = None
        self.error: str | None = None
        self._last_ok: float | None = None
        self._wake = asyncio.Event()
        self._seen: set[str] = set()  # members seen since start, so a lost one shows as down
        self.reservations_made = 0
        self.reservation_conflicts = 0
        self.reservations_refused = 0

    # ------------------------------------------------------------------ freshness

    def fresh(self) -> bool:
        return self._last_ok is not None and self._clock.monotonic() - self._last_ok < self.ttl

    def stale_reason(self) -> str:
        if self._last_ok is None:
            return f"not joined the fleet yet: {self.error or 'connecting to etcd'}"
        ago = self._clock.monotonic() - self._last_ok
        return f"fleet state is stale (no answer from etcd for {ago:.0f}s): {self.error}"

    def seen(self) -> set[str]:
        return set(self._seen)

    # ------------------------------------------------------------------ membership

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "version": self.version,
            "labels": self.labels,
            **self._local(),
            "updated": self._clock.time(),
        }

    async def _ensure_lease(self) -> None:
        if self.lease:
            if await self.etcd.keepalive(self.lease) > 0:
                return
            log.warning("fleet.lease_expired", lease=self.lease)
        self.lease = await self.etcd.grant(math.ceil(self.ttl))
        log.info("fleet.joined", lease=self.lease, endpoints=self.etcd.endpoints)

    async def beat(self) -> FleetView:
        """Renew the lease, publish this host's record, read the fleet. Raises FleetUnavailable."""
        await self._ensure_lease()
        await self.etcd.txn([], [self._record_op()])
        return await self.refresh()

    async def refresh(self) -> FleetView:
        revision, kvs = await self.etcd.range_prefix(self.keys.prefix)
        self.view = decode(self.keys, revision, kvs)
        self._seen |= set(self.view.members)
        self._last_ok = self._clock.monotonic()
        if self.error is not None:
            log.info("fleet.reachable_again")
        self.error = None
        return self.view

    async def run(self) -> None:
        """Beat every interval until cancelled; failures are remembered, never raised."""
        while True:
            try:
                await self.beat()
            except FleetUnavailable as exc:
                if self.error != str(exc):
                    log.warning("fleet.unavailable", error=str(exc))
                self.error = str(exc)
            except Exception as exc:  # the fleet is advisory: it must never stop the agent
                log.exception("fleet.beat_failed")
                self.error = f"beat failed: {type(exc).__name__}: {exc}"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def poke(self) -> None:
        """Beat now instead of at the next interval (a drain request changed)."""
        self._wake.set()

    async def leave(self) -> None:
        """Give the lease back: record, drain request and reservations go at once."""
        if self.lease:
            with contextlib.suppress(FleetUnavailable):
                await self.etcd.revoke(self.lease)
            self.lease = 0

    # ------------------------------------------------------------------ drain queue

    async def enqueue_drain(self, reason: str) -> None:
        """Join the drain queue (idempotent). Raises FleetUnavailable."""
        await self._ensure_lease()
        key = self.keys.drain(self.name)
        body = json.dumps({"reason": reason, "since": self._clock.time()}).encode()
        # Bumping seq/<self> makes any reservation on this host that read the
        # state before this request fail its transaction.
        await self.etcd.txn(
            [cmp_create(key, "EQUAL", 0)],
            [
                op_put(key, body, self.lease),
                op_put(self.keys.seq(self.name), b""),
                self._record_op(),
            ],
        )
        await self.refresh()

    async def dequeue_drain(self) -> None:
        """Leave the queue; the record says "not draining" in the same revision, so the
        host that takes the freed slot never sees this one as still draining."""
        await self._ensure_lease()
        await self.etcd.txn([], [self._record_op(), op_delete(self.keys.drain(self.name))])
        await self.refresh()

    def _record_op(self) -> dict[str, Any]:
        return op_put(self.keys.member(self.name), json.dumps(self.record()).encode(), self.lease)

    def drain_position(self) -> tuple[str, list[str]]:
        """("draining", []), ("queued", [hosts holding the budget]) or ("idle", [])."""
        view = self.view
        if view is None or self.name not in view.queue:
            return "idle", []
        holders = view.holders(self.budget)
        if self.name in holders:
            return "draining", []
        return "queued", holders

    # ------------------------------------------------------------------ reservations

    async def reserve(
        self,
        target: str,
        mid: str,
        memory: int,
        disk: int,
        spread: str | None = None,
        attempts: int = 20,
    ) -> None:
        """Hold `memory` and `disk` on `target` for migration `mid`, atomically.

        Raises ReservationRefused (with why) or FleetUnavailable.
        """
        if not self.lease:
            raise FleetUnavailable(self.stale_reason())
        try:
            await self._reserve(target, mid, memory, disk, spread, attempts)
        except ReservationRefused:
            self.reservations_refused += 1
            raise

    async def _reserve(
        self, target: str, mid: str, memory: int, disk: int, spread: str | None, attempts: int
    ) -> None:
        k = self.keys
        reads = [
            op_range(k.member(target)),
            op_range(k.drain(target)),
            op_range_prefix(k.resv_prefix(target)),
            op_range(k.seq(target)),
        ]
        _, state, _ = await self.etcd.txn([], reads)
        for attempt in range(attempts):
            members, drains, held, seq = state
            if not members:
                raise ReservationRefused(f"{target} is not in the fleet (no live lease)")
            if drains:
                raise ReservationRefused(f"{target} is draining or queued to drain")
            view = decode(k, 0, [*members, *held])
            member = view.members[target]
            if member.draining:
                raise ReservationRefused(f"{target} is draining")
            self._check_room(target, member, view, memory, disk, spread)
            seq_rev = seq[0].mod_revision if seq else 0
            body = {
                "source": self.name,
                "memory_bytes": memory,
                "disk_bytes": disk,
                "spread": spread,
                "at": self._clock.time(),
            }
            # On a lost race the failure branch reads the target's state again, in the
            # same round trip and at the revision the comparison saw.
            ok, state, _ = await self.etcd.txn(
                [
                    cmp_mod(k.seq(target), "EQUAL", seq_rev),
                    cmp_create(k.member(target), "GREATER", 0),
                    cmp_create(k.drain(target), "EQUAL", 0),
                ],
                [
                    op_put(k.resv(target, mid), json.dumps(body).encode(), self.lease),
                    op_put(k.seq(target), b""),
                ],
                reads,
            )
            if ok:
                self.reservations_made += 1
                return
            self.reservation_conflicts += 1
            await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
        raise ReservationRefused(f"{target} is contended ({attempts} tries lost); try again")

    def _check_room(
        self,
        target: str,
        member: Any,
        view: FleetView,
        memory: int,
        disk: int,
        spread: str | None,
    ) -> None:
        held = view.reservations.get(target, [])
        if spread:
            if spread in member.spread:
                raise ReservationRefused(f"{target} already runs a replica of spread {spread!r}")
            if any(r.spread == spread for r in held):
                raise ReservationRefused(f"a replica of spread {spread!r} is moving to {target}")
        held_mem, held_disk = view.reserved(target)
        free_mem = member.num("mem_available_bytes")
        need = int(memory * (1 + HEADROOM))
        if memory > 0 and free_mem > 0 and need > free_mem - held_mem:
            raise ReservationRefused(
                f"not enough memory on {target}: needs {_mib(need)}, "
                f"{_mib(max(free_mem - held_mem, 0))} left after {_mib(held_mem)} reserved"
            )
        free_disk = member.num("disk_free_bytes")
        need_disk = int(disk * (1 + HEADROOM))
        if disk > 0 and free_disk > 0 and need_disk > free_disk - held_disk:
            raise ReservationRefused(
                f"not enough disk on {target}: needs {_mib(need_disk)}, "
                f"{_mib(max(free_disk - held_disk, 0))} left after {_mib(held_disk)} reserved"
            )

    async def release(self, target: str, mid: str) -> None:
        """Give the capacity back; on failure the lease takes it back when this agent goes."""
        try:
            await self.etcd.delete(self.keys.resv(target, mid))
        except FleetUnavailable as exc:
            log.warning("fleet.release_failed", target=target, migration=mid, error=str(exc))

"""Which opted-in containers of this host can move now, remembered until something changes.

The eligibility check (agent.migration.eligibility) asks Docker and every peer,
so its answers are kept per container, keyed by a fingerprint of what could
change them: the container (id, state, labels, memory limit) and the peers'
health (reachable, draining, overloaded). A container known not to move is
left out of policy selection (`known_unmovable`) until its fingerprint changes,
so drain converges instead of retrying a refusal for ever; `ferry status`
shows it with the reason (`survey`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from agent.migration.eligibility import Eligibility
from agent.migration.errors import MigrationRefused
from agent.model import Clock, ContainerInfo, PeerDirectory
from agent.policy.selectors import opted_in

log = structlog.get_logger(__name__)

Check = Callable[[str, str | None], Awaitable[Eligibility]]
CHECK_TTL = 60.0  # a peer can change in ways its health does not show (a port bound there)


@dataclass
class _Known:
    fingerprint: tuple[Any, ...]
    checked_at: float
    verdict: Eligibility


class Movability:
    def __init__(
        self,
        check: Check,
        inventory: Callable[[], Sequence[ContainerInfo]],
        peers: PeerDirectory,
        clock: Clock,
        ttl: float = CHECK_TTL,
    ) -> None:
        self._check = check
        self._inventory = inventory
        self._peers = peers
        self._clock = clock
        self._ttl = ttl
        self._known: dict[str, _Known] = {}  # container name -> last answer

    def _peers_key(self) -> tuple[Any, ...]:
        return tuple(
            sorted(
                (p.name, p.reachable, p.draining, p.overloaded, p.protocol, p.protocol_oldest)
                for p in self._peers.peers()
            )
        )

    def fingerprint(
        self, info: ContainerInfo, peers: tuple[Any, ...] | None = None
    ) -> tuple[Any, ...]:
        labels = tuple(sorted(info.labels.items()))
        key = peers if peers is not None else self._peers_key()
        return (info.id, info.state, info.memory_bytes, labels, key)

    def remember(self, info: ContainerInfo, verdict: Eligibility) -> None:
        self._known[info.name] = _Known(self.fingerprint(info), self._clock.monotonic(), verdict)

    async def verdict(self, info: ContainerInfo) -> Eligibility:
        """The check's answer for this container, asked again only when it may differ."""
        known = self._known.get(info.name)
        fresh = known is not None and known.fingerprint == self.fingerprint(info)
        if known is not None and fresh and self._clock.monotonic() - known.checked_at < self._ttl:
            return known.verdict
        verdict = await self._check(info.name, None)
        if known is not None and not fresh and not verdict.movable:
            log.info("movability.rechecked", container=info.name, reason=verdict.summary())
        self.remember(info, verdict)
        return verdict

    def known_unmovable(self) -> set[str]:
        """Ids of containers that cannot move for a reason that holds until something changes."""
        if not self._known:
            return set()  # asked every tick by every policy: nothing to compute most of the time
        peers = self._peers_key()
        out = set()
        for info in self._inventory():
            known = self._known.get(info.name)
            if (
                known is not None
                and known.verdict.permanent
                and known.fingerprint == self.fingerprint(info, peers)
            ):
                out.add(info.id)
        return out

    def reason(self, name: str) -> str | None:
        known = self._known.get(name)
        return known.verdict.summary() if known is not None and known.verdict.permanent else None

    async def survey(self) -> list[dict[str, Any]]:
        """Opted-in containers that cannot move now, or are stopped and stay behind."""
        inventory = list(self._inventory())
        out: list[dict[str, Any]] = []
        running: list[ContainerInfo] = []
        for info in inventory:
            if not opted_in(info):
                continue
            if info.state == "running":
                running.append(info)
                continue
            out.append(
                {
                    "container": info.name,
                    "state": "left_behind",
                    "reason": f"{info.state}: only running containers move; it stays here",
                }
            )
        # Together: one slow peer must not make `ferry status` wait once per container.
        answers = await asyncio.gather(
            *(self.verdict(info) for info in running), return_exceptions=True
        )
        for info, verdict in zip(running, answers, strict=True):
            if isinstance(verdict, MigrationRefused):  # gone between listing and checking
                log.debug("movability.check_failed", container=info.name, reason=verdict.reason)
                continue
            if isinstance(verdict, BaseException):
                raise verdict
            if not verdict.movable:
                out.append(
                    {
                        "container": info.name,
                        "state": "cannot_move",
                        "reason": verdict.summary(),
                        "permanent": verdict.permanent,
                    }
                )
        for gone in set(self._known) - {info.name for info in inventory}:
            del self._known[gone]
        return out

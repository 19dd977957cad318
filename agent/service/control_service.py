"""What `ferry status`, `drain`, `undrain` and `history` get from a running agent.

Drain and undrain only write or remove the marker file, the same as an
operator would by hand; the policies and the peer API follow the file. The
transition is applied at once anyway, so the answer and the systemd STATUS
line are already current when the command returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from agent.fleet.runtime import FleetParts
    from agent.journal import Journal
    from agent.model import Clock, PeerDirectory
    from agent.policy.engine import PolicyEngine
    from agent.service.drain import DrainMarker
    from agent.service.evacuation import Evacuator
    from agent.service.movability import Movability
    from agent.service.policy_loop import PolicyLoop
    from agent.signals.store import SignalStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ControlParts:
    """The parts of a started agent the control socket reads, handed over once they all exist."""

    host: str
    dry_run: bool
    clock: Clock
    started_at: float  # wall time
    store: SignalStore
    engine: PolicyEngine
    peers: PeerDirectory
    evacuator: Evacuator
    policy_loop: PolicyLoop
    drain: DrainMarker
    draining: Callable[[], bool]
    drain_reason: Callable[[], str | None]
    overloaded: Callable[[], bool]
    journal: Journal | None = None  # None when the engine keeps no journal (tests)
    movability: Movability | None = None  # None when the engine cannot check
    fleet: FleetParts | None = None  # only with a `fleet:` config section
    # Migrations moving memory pages now (post-copy, lazy fill): {id: container, how, bytes}.
    pages: Callable[[], dict[str, dict[str, Any]]] | None = None


class AgentControl:
    """The ControlService the control socket serves, reading the agent's parts as they are now."""

    def __init__(self, parts: ControlParts) -> None:
        self._parts = parts

    async def status(self) -> dict[str, Any]:
        agent = self._parts
        now_mono, now_wall = agent.clock.monotonic(), agent.clock.time()
        policies = []
        for s in agent.engine.states():
            d = asdict(s)
            d["since_wall"] = now_wall - (now_mono - s.since)
            policies.append(d)
        migrations = await self._in_flight()
        in_doubt = await self._in_doubt()
        return {
            "host": agent.host,
            "version": _version(),
            "uptime_s": round(time.time() - agent.started_at, 1),
            "draining": agent.draining(),
            "drain_reason": agent.drain_reason(),
            "overloaded": agent.overloaded(),
            "dry_run": agent.dry_run,
            "status_line": agent.policy_loop.status_line,
            "signals": agent.store.snapshot(),
            "policies": policies,
            "migrations": migrations,
            # Committed but unconfirmed: the container runs nowhere until resolved.
            "in_doubt": in_doubt,
            "evacuation": agent.evacuator.status(),
            # Opted-in containers that cannot move now (and why), or are stopped and stay.
            "unmovable": await agent.movability.survey() if agent.movability is not None else [],
            "peers": [asdict(p) for p in agent.peers.peers()],
            **({"fleet": agent.fleet.status()} if agent.fleet is not None else {}),
            "drain_progress": self._drain_progress(),
        }

    def _drain_progress(self) -> dict[str, Any]:
        """What `ferry drain --wait` watches: opted-in containers still running here."""
        left = sorted(
            c.name
            for c in self._parts.store.containers()
            if c.state == "running" and c.labels.get("ferry.migrate") == "true"
        )
        return {"marker": self._parts.drain.active(), "remaining": left}

    async def _in_flight(self) -> list[dict[str, Any]]:
        journal = self._parts.journal
        if journal is None:
            return []
        records = await asyncio.to_thread(journal.unfinished)
        pages = dict(self._parts.pages()) if self._parts.pages is not None else {}
        out = [
            {
                "id": r.id,
                "container": r.container_name,
                "role": r.role,
                "source": r.source,
                "target": r.target,
                "phase": r.phase,
                "started_at": r.started,
                **({"pages": pages.pop(r.id)} if r.id in pages else {}),
            }
            for r in records
        ]
        # Committed already, its pages still filling in from this host's disk.
        for mid, p in pages.items():
            out.append(
                {"id": mid, "container": p.get("container"), "phase": p.get("how"), "pages": p}
            )
        return out

    async def _in_doubt(self) -> list[dict[str, Any]]:
        journal = self._parts.journal
        if journal is None:
            return []
        records = await asyncio.to_thread(journal.in_doubt)
        return [
            {
                "id": r.id,
                "container": r.container_name,
                "target": r.target,
                "reason": r.reason,
                "since": r.updated,
                "resolve": f"ferry resolve {r.id} --keep source|target",
            }
            for r in records
        ]

    async def drain(self, reason: str) -> dict[str, Any]:
        fleet = self._parts.fleet
        if fleet is not None:
            return await self._fleet_drain(fleet, reason)
        marker = self._parts.drain
        await asyncio.to_thread(marker.set, reason)
        log.info("agent.drain_requested", reason=reason, marker=str(marker.path))
        self._follow_marker()
        return {"draining": True, "message": f"drain marker {marker.path} set; evacuation starts"}

    async def _fleet_drain(self, fleet: Any, reason: str) -> dict[str, Any]:
        from agent.fleet.etcd import FleetUnavailable
        from agent.service.control import ControlRefused

        try:
            state = await fleet.drain.request(reason)
        except FleetUnavailable as exc:
            raise ControlRefused(
                f"drain refused: the fleet's drain budget cannot be checked ({exc}); "
                "nothing was changed"
            ) from None
        log.info("agent.fleet_drain_requested", reason=reason, state=state["state"])
        self._follow_marker()
        if state["state"] == "draining":
            message = "this host holds a fleet drain slot; evacuation starts"
        else:
            message = (
                f"queued behind {', '.join(state['queued_behind']) or '?'} "
                f"(fleet.max_draining_hosts={state['max_draining_hosts']}); "
                "refusing incoming containers meanwhile"
            )
        return {"draining": True, "fleet": state, "message": message}

    async def undrain(self) -> dict[str, Any]:
        fleet = self._parts.fleet
        if fleet is not None:
            existed = await fleet.drain.cancel()
            self._follow_marker()
            what = "left the fleet's drain queue" if existed else "was not draining"
            return {"draining": False, "message": f"{what}; accepting again"}
        marker = self._parts.drain
        existed = await asyncio.to_thread(marker.clear)
        log.info("agent.undrain_requested", marker=str(marker.path), was_draining=existed)
        self._follow_marker()
        what = "removed" if existed else "was not set"
        return {
            "draining": False,
            "message": f"drain marker {marker.path} {what}; accepting again",
        }

    async def history(self, limit: int) -> list[dict[str, Any]]:
        journal = self._parts.journal
        if journal is None:
            return []
        records = await asyncio.to_thread(journal.history, limit)
        return [asdict(r) for r in records]

    def _follow_marker(self) -> None:
        self._parts.policy_loop.check_drain_transition()
        self._parts.policy_loop.update_status()


def _version() -> str:
    from agent import __version__

    return __version__

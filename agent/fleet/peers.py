"""The peer directory with the fleet in it: static peers as polled, plus every host
with a live lease, with the fleet's drain queue and reservations taken into account."""

from __future__ import annotations

import dataclasses

from agent.fleet.fleet import Fleet
from agent.fleet.view import FleetView
from agent.model import PeerDirectory, PeerHealth
from agent.peer import protocol


def _spread(view: FleetView, host: str) -> tuple[str, ...]:
    """Spread keys running on `host` (its record) or on their way there (reservations)."""
    member = view.members.get(host)
    running = member.spread if member is not None else set()
    moving = {r.spread for r in view.reservations.get(host, []) if r.spread}
    return tuple(sorted(running | moving))


class FleetPeers:
    def __init__(self, static: PeerDirectory, fleet: Fleet) -> None:
        self._static = static
        self._fleet = fleet

    def peers(self) -> list[PeerHealth]:
        fleet = self._fleet
        view = fleet.view
        fresh = fleet.fresh()
        queued = set(view.queue) if view is not None and fresh else set()
        out = []
        static = self._static.peers()
        for peer in static:
            if peer.name in queued and not peer.draining:
                peer = dataclasses.replace(peer, draining=True)
            if view is not None and fresh:
                spread = tuple(sorted({*peer.spread, *_spread(view, peer.name)}))
                peer = dataclasses.replace(peer, spread=spread)
            if view is not None and fresh and peer.mem_available_bytes > 0:
                held, _ = view.reserved(peer.name)
                peer = dataclasses.replace(
                    peer, mem_available_bytes=max(peer.mem_available_bytes - held, 0)
                )
            out.append(peer)
        names = {p.name for p in static} | {fleet.name}
        members = view.members if view is not None else {}
        for name in sorted((set(members) | fleet.seen()) - names):
            member = members.get(name)
            if member is None:
                out.append(
                    PeerHealth(name=name, reachable=False, error=f"peer {name}: lease expired")
                )
                continue
            held, _ = view.reserved(name) if view is not None else (0, 0)
            labels = member.record.get("labels") or {}
            error = None if fresh else f"peer {name}: {fleet.stale_reason()}"
            try:
                speaks = protocol.of(member.record)
                oldest = protocol.of(member.record, protocol.OLDEST_KEY)
            except ValueError as exc:  # not a record any agent writes: never a target
                speaks, oldest, error = 1, 1, f"peer {name}: bad fleet record: {exc}"
            out.append(
                PeerHealth(
                    name=name,
                    reachable=error is None,
                    draining=member.draining or name in queued,
                    overloaded=bool(member.record.get("overloaded", False)),
                    load1=float(member.record.get("load1", 0.0) or 0.0),
                    cpu_pressure=float(member.record.get("cpu_pressure", 0.0) or 0.0),
                    mem_available_bytes=max(member.num("mem_available_bytes") - held, 0),
                    disk_free_bytes=member.num("disk_free_bytes"),
                    running_containers=member.num("running_containers"),
                    tags=tuple(f"{k}={v}" for k, v in sorted(labels.items())),
                    spread=_spread(view, name) if view is not None else (),
                    protocol=speaks,
                    protocol_oldest=oldest,
                    error=error,
                )
            )
        return out

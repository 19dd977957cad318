"""Choosing a target peer for each container a policy moves.

A peer is a candidate only if it is reachable, not draining, not overloaded,
speaks a peer protocol this agent still migrates with, is allowed by the
policy's ``targets.peers`` and (when both sides report memory) has room for
the container. Strategies:

- ``least_loaded``: lowest CPU pressure, then fewest containers.
- ``weighted``: containers shared in proportion to peer weight.
- ``spread``: one at a time to whichever peer then has the fewest containers.

Placement is computed for the whole batch so later choices see earlier ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.model import SPREAD_LABEL, ContainerInfo, PeerHealth
from agent.peer import protocol


@dataclass
class Placement:
    assigned: list[tuple[ContainerInfo, str]] = field(default_factory=list)
    unplaced: list[ContainerInfo] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # unplaced container -> why
    rejected: dict[str, str] = field(default_factory=dict)  # peer -> why it was not a candidate


def peer_rejection(peer: PeerHealth, allowed: str | Sequence[str], self_name: str | None) -> str:
    """Why a peer may not receive containers, or "" if it may."""
    if self_name is not None and peer.name == self_name:
        return "self"
    if allowed != "any" and peer.name not in allowed:
        return "not in targets"
    if not peer.reachable:
        return "unreachable"
    if peer.draining:
        return "draining"
    if peer.overloaded:
        return "overloaded"
    behind = protocol.mismatch(peer.protocol, peer.protocol_oldest)
    return str(behind) if behind else ""


@dataclass
class _Slot:
    peer: PeerHealth
    assigned: int = 0
    mem_left: int = 0
    spread: set[str] = field(default_factory=set)

    def has_replica(self, key: str) -> bool:
        return key in self.peer.spread or key in self.spread

    def fits(self, container: ContainerInfo) -> bool:
        key = container.labels.get(SPREAD_LABEL)
        if key and self.has_replica(key):
            return False  # a replica of the same service is already there
        if container.memory_bytes <= 0 or self.peer.mem_available_bytes <= 0:
            return True  # unknown on either side: let the target's own admission check decide
        return container.memory_bytes <= self.mem_left


def _key(strategy: str, slot: _Slot) -> tuple[float, ...]:
    p = slot.peer
    count = p.running_containers + slot.assigned
    if strategy == "least_loaded":
        return (p.cpu_pressure, count, -slot.mem_left)
    if strategy == "weighted":
        return ((slot.assigned + 1) / max(p.weight, 1e-9), count)
    if strategy == "spread":
        return (count, p.cpu_pressure)
    raise ValueError(f"unknown placement {strategy!r}")


def place(
    strategy: str,
    containers: Iterable[ContainerInfo],
    peers: Iterable[PeerHealth],
    allowed: str | Sequence[str] = "any",
    self_name: str | None = None,
) -> Placement:
    result = Placement()
    slots = []
    for peer in peers:
        why = peer_rejection(peer, allowed, self_name)
        if why:
            result.rejected[peer.name] = why
        else:
            slots.append(_Slot(peer, mem_left=peer.mem_available_bytes))
    for container in containers:
        fitting = [s for s in slots if s.fits(container)]
        if not fitting:
            result.unplaced.append(container)
            key = container.labels.get(SPREAD_LABEL)
            if slots and key and all(s.has_replica(key) for s in slots):
                result.why[container.name] = (
                    f"every eligible peer already has a replica of {SPREAD_LABEL}={key}"
                )
            continue
        best = min(fitting, key=lambda s: (*_key(strategy, s), s.peer.name))
        best.assigned += 1
        best.mem_left -= max(container.memory_bytes, 0)
        if container.labels.get(SPREAD_LABEL):
            best.spread.add(container.labels[SPREAD_LABEL])
        result.assigned.append((container, best.peer.name))
    return result

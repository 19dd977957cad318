"""What the fleet looks like from one agent: members, reservations and the drain queue,
decoded from one range read of the key prefix.

Key layout under the prefix (values are JSON):
  members/<host>          the host's record, bound to its lease
  drain/<host>            a drain request; order of creation is the queue order; lease-bound
  resv/<target>/<id>      capacity held on <target> for one migration; bound to the source's lease
  seq/<target>            bumped by every reservation on and drain request of <target>, so
                          two transactions that read the same state cannot both commit
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.fleet.etcd import KV


@dataclass(frozen=True)
class Keys:
    prefix: str

    def member(self, host: str) -> str:
        return f"{self.prefix}members/{host}"

    def drain(self, host: str) -> str:
        return f"{self.prefix}drain/{host}"

    def resv_prefix(self, target: str) -> str:
        return f"{self.prefix}resv/{target}/"

    def resv(self, target: str, mid: str) -> str:
        return f"{self.prefix}resv/{target}/{mid}"

    def seq(self, target: str) -> str:
        return f"{self.prefix}seq/{target}"


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    record: dict[str, Any]
    mod_revision: int

    def num(self, key: str) -> int:
        value = self.record.get(key, 0)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    @property
    def draining(self) -> bool:
        return bool(self.record.get("draining", False))

    @property
    def spread(self) -> set[str]:
        values = self.record.get("spread", [])
        return {str(v) for v in values} if isinstance(values, list) else set()


@dataclass(frozen=True)
class Reservation:
    target: str
    mid: str
    source: str
    memory_bytes: int
    disk_bytes: int
    spread: str | None


@dataclass
class FleetView:
    revision: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    queue: list[str] = field(default_factory=list)  # drain requests, oldest first
    drain_reasons: dict[str, str] = field(default_factory=dict)
    reservations: dict[str, list[Reservation]] = field(default_factory=dict)

    def holders(self, budget: int) -> list[str]:
        return self.queue[:budget]

    def reserved(self, target: str) -> tuple[int, int]:
        held = self.reservations.get(target, [])
        return sum(r.memory_bytes for r in held), sum(r.disk_bytes for r in held)


def _json(kv: KV) -> dict[str, Any]:
    try:
        value = json.loads(kv.value)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def decode(keys: Keys, revision: int, kvs: list[KV]) -> FleetView:
    view = FleetView(revision=revision)
    queued: list[tuple[int, str]] = []
    p = keys.prefix
    for kv in kvs:
        rest = kv.key[len(p) :] if kv.key.startswith(p) else ""
        kind, _, name = rest.partition("/")
        if kind == "members" and name:
            record = _json(kv)
            view.members[name] = Member(
                name, str(record.get("address", "")), record, kv.mod_revision
            )
        elif kind == "drain" and name:
            queued.append((kv.create_revision, name))
            view.drain_reasons[name] = str(_json(kv).get("reason", ""))
        elif kind == "resv" and "/" in name:
            target, _, mid = name.partition("/")
            data = _json(kv)
            spread = data.get("spread")
            view.reservations.setdefault(target, []).append(
                Reservation(
                    target,
                    mid,
                    str(data.get("source", "")),
                    int(data.get("memory_bytes", 0) or 0),
                    int(data.get("disk_bytes", 0) or 0),
                    str(spread) if spread else None,
                )
            )
    view.queue = [name for _, name in sorted(queued)]
    return view

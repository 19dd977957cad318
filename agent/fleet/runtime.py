"""Wiring the fleet into a running agent: the only place that knows both sides.

The agent calls `attach_fleet` when its config has a `fleet:` section; every
seam it touches is named here: the peer directory, the migrator, the
evacuator's gate, the peer clients and allowed peer names, the control
socket's drain, status and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, MutableMapping, MutableSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config import FerryConfig
from agent.fleet.drain import FleetDrain
from agent.fleet.etcd import Etcd, FleetUnavailable
from agent.fleet.fleet import Fleet
from agent.fleet.migrator import SPREAD_LABEL, FleetMigrator
from agent.fleet.peers import FleetPeers
from agent.model import ContainerInfo, PeerDirectory
from agent.service.drain import DrainMarker

log = structlog.get_logger(__name__)

REQUEST_FILE = "fleet-drain-request"
# Hosts learnt from etcd, with their addresses, kept on local disk: after a restart,
# reconcile must reach the target of an unfinished migration even while etcd is down.
KNOWN_FILE = "fleet-peers.json"


def load_known(state_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((state_dir / KNOWN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str) and v}


def save_known(state_dir: Path, known: dict[str, str]) -> None:
    tmp = state_dir / f".{KNOWN_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(known, sort_keys=True))
        tmp.replace(state_dir / KNOWN_FILE)
    except OSError as exc:
        log.warning("fleet.known_peers_not_saved", error=str(exc))


def restore_known(
    state_dir: Path,
    static_names: frozenset[str],
    clients: dict[str, Any],
    engine_peers: MutableMapping[str, Any] | None,
    make_client: Callable[[str, str], Any] | None,
) -> list[str]:
    """Clients for the hosts learnt from etcd before this start, without asking etcd."""
    if engine_peers is None or make_client is None:
        return []
    restored = []
    for name, address in sorted(load_known(state_dir).items()):
        if name in static_names or name in engine_peers:
            continue
        clients[name] = engine_peers[name] = make_client(name, address)
        restored.append(name)
    return restored


@dataclass
class FleetParts:
    fleet: Fleet
    drain: FleetDrain
    peers: FleetPeers
    static_names: frozenset[str]
    clients: dict[str, Any] = field(default_factory=dict)  # peer clients made for discovered hosts
    state_dir: Path | None = None
    discovered: set[str] = field(default_factory=set)
    migrator: FleetMigrator | None = None

    def status(self) -> dict[str, Any]:
        """`ferry fleet status` and the `fleet` part of `ferry status`."""
        fleet = self.fleet
        view = fleet.view
        members = view.members if view is not None else {}
        queue = view.queue if view is not None else []
        holders = queue[: fleet.budget]
        hosts = []
        for name in sorted(set(members) | fleet.seen() | {fleet.name}):
            member = members.get(name)
            mem, disk = view.reserved(name) if view is not None else (0, 0)
            record = member.record if member is not None else {}
            hosts.append(
                {
                    "name": name,
                    "up": member is not None,
                    "address": record.get("address"),
                    "drain": "draining"
                    if name in holders
                    else "queued"
                    if name in queue
                    else "draining (local marker)"
                    if record.get("draining")
                    else "no",
                    "mem_available_bytes": record.get("mem_available_bytes"),
                    "disk_free_bytes": record.get("disk_free_bytes"),
                    "running_containers": record.get("running_containers"),
                    "in_flight": record.get("in_flight", 0),
                    "reserved_memory_bytes": mem,
                    "reserved_disk_bytes": disk,
                    "labels": record.get("labels", {}),
                    "version": record.get("version"),
                }
            )
        return {
            "self": fleet.name,
            "fresh": fleet.fresh(),
            "error": None if fleet.fresh() else fleet.stale_reason(),
            "endpoints": fleet.etcd.endpoints,
            "max_draining_hosts": fleet.budget,
            "drain_queue": queue,
            "drain": self.drain.state(),
            "hosts": hosts,
        }


def local_record(
    base: Callable[[], dict[str, Any]],
    containers: Callable[[], list[ContainerInfo]],
    draining: Callable[[], bool],
    in_flight: Callable[[], int],
) -> Callable[[], dict[str, Any]]:
    """What this host publishes about itself each heartbeat."""

    def record() -> dict[str, Any]:
        doc = dict(base())
        running = [c for c in containers() if c.state == "running"]
        doc["spread"] = sorted(
            {c.labels[SPREAD_LABEL] for c in running if c.labels.get(SPREAD_LABEL)}
        )
        doc["draining"] = draining()
        doc["in_flight"] = in_flight()
        return doc

    return record


def build_fleet(
    config: FerryConfig,
    static: PeerDirectory,
    marker: DrainMarker,
    local: Callable[[], dict[str, Any]],
    version: str,
    on_drain_change: Callable[[], None],
    clients: dict[str, Any],
) -> FleetParts:
    fc = config.fleet
    assert fc is not None and fc.advertise is not None  # filled by FerryConfig
    etcd = Etcd(fc.endpoints, ca=fc.ca, cert=fc.cert, key=fc.key, timeout=fc.request_timeout)
    fleet = Fleet(
        etcd,
        name=config.name,
        address=fc.advertise,
        prefix=fc.prefix,
        lease_ttl=fc.lease_ttl,
        max_draining_hosts=fc.max_draining_hosts,
        labels=dict(fc.labels),
        version=version,
        local=local,
    )
    drain = FleetDrain(fleet, marker, config.state_dir / REQUEST_FILE, on_drain_change)
    return FleetParts(
        fleet=fleet,
        drain=drain,
        peers=FleetPeers(static, fleet),
        static_names=frozenset(p.name for p in config.peers),
        clients=clients,
        state_dir=config.state_dir,
    )


async def sync_peers(
    parts: FleetParts,
    engine_peers: MutableMapping[str, Any] | None,
    allowed: MutableSet[str],
    make_client: Callable[[str, str], Any] | None,
) -> None:
    """Give the migration engine a client, and the peer server a welcome, for every
    host with a live lease; hosts whose lease expired lose the welcome again."""
    while True:
        try:
            await _sync_once(parts, engine_peers, allowed, make_client)
        except Exception:  # a bad record must not stop discovery, nor the agent
            log.exception("fleet.peer_sync_failed")
        await asyncio.sleep(parts.fleet.interval)


async def _sync_once(
    parts: FleetParts,
    engine_peers: MutableMapping[str, Any] | None,
    allowed: MutableSet[str],
    make_client: Callable[[str, str], Any] | None,
) -> None:
    fleet = parts.fleet
    view = fleet.view
    if view is None or not fleet.fresh():
        return
    live = {n for n in view.members if n != fleet.name}
    for name in live - parts.static_names:
        allowed.add(name)
        parts.discovered.add(name)
        member = view.members[name]
        known = parts.clients.get(name)
        if engine_peers is None or make_client is None or not member.address:
            continue
        if known is None or getattr(known, "address", None) != member.address:
            client = make_client(name, member.address)
            parts.clients[name] = client
            engine_peers[name] = client
            log.info("fleet.peer_discovered", peer=name, address=member.address)
            if parts.state_dir is not None:
                addresses = {n: str(getattr(c, "address", "")) for n, c in parts.clients.items()}
                await asyncio.to_thread(save_known, parts.state_dir, addresses)
    for name in parts.discovered - live:
        parts.discovered.discard(name)
        allowed.discard(name)
        log.info("fleet.peer_left", peer=name)


async def first_beat(fleet: Fleet) -> None:
    """Join before serving when etcd answers; a fleet that does not is joined later."""
    try:
        await asyncio.wait_for(fleet.beat(), fleet.ttl)
    except (FleetUnavailable, TimeoutError) as exc:
        fleet.error = str(exc) or "timed out"
        log.warning("fleet.join_deferred", error=fleet.error)


async def close_fleet(parts: FleetParts) -> None:
    if parts.migrator is not None:
        await parts.migrator.close()
    with contextlib.suppress(Exception):
        await parts.fleet.leave()
    for client in parts.clients.values():
        with contextlib.suppress(Exception):
            await client.close()
    parts.fleet.etcd.close()

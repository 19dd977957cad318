"""Membership, reservations, the drain queue and spread against a real etcd."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.fleet.etcd import Etcd, FleetUnavailable
from agent.fleet.fleet import Fleet, ReservationRefused
from agent.fleet.peers import FleetPeers
from agent.model import PeerHealth
from tests.etcd_cluster import EtcdCluster
from tests.fleet.conftest import client
from tests.helpers import run_async

GIB = 1 << 30


class NoStatic:
    def peers(self) -> list[PeerHealth]:
        return []


def make(
    cluster: EtcdCluster,
    prefix: str,
    name: str,
    *,
    mem: int = 8 * GIB,
    ttl: float = 3.0,
    budget: int = 1,
    spread: list[str] | None = None,
    etcd: Etcd | None = None,
    extra: dict[str, Any] | None = None,
) -> Fleet:
    local: dict[str, Any] = {
        "mem_available_bytes": mem,
        "disk_free_bytes": 100 * GIB,
        "running_containers": 0,
        "draining": False,
        "spread": spread or [],
        **(extra or {}),
    }
    return Fleet(
        etcd or client(cluster),
        name=name,
        address=f"127.0.0.1:{7000 + len(name)}",
        prefix=prefix,
        lease_ttl=ttl,
        max_draining_hosts=budget,
        labels={"rack": "r1"},
        version="test",
        local=lambda: local,
    )


def test_members_discover_each_other_and_a_dead_one_leaves(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    async def scenario() -> None:
        a, b = make(etcd_cluster, prefix, "a"), make(etcd_cluster, prefix, "b")
        odd = make(etcd_cluster, prefix, "c", extra={"protocol": "two"})
        await a.beat()
        await b.beat()
        await odd.beat()
        view = await a.refresh()
        assert set(view.members) == {"a", "b", "c"}
        assert view.members["b"].record["labels"] == {"rack": "r1"}
        peers = {p.name: p for p in FleetPeers(NoStatic(), a).peers()}
        assert peers["b"].reachable and peers["b"].mem_available_bytes == 8 * GIB
        # A record no agent writes is listed with why, and never chosen as a target.
        assert not peers["c"].reachable
        assert "bad fleet record: protocol must be" in (peers["c"].error or "")
        await odd.leave()
        # b stops renewing (crashed or cut off): its lease expires and it is gone.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "b" in (await a.beat()).members:
            assert loop.time() < deadline, "b's record outlived its lease"
            await asyncio.sleep(0.2)
        down = {p.name: p for p in FleetPeers(NoStatic(), a).peers()}["b"]
        assert not down.reachable and "lease expired" in (down.error or "")
        await a.leave()

    run_async(scenario())


def test_reservations_under_contention_never_oversubscribe(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    async def scenario() -> None:
        target = make(etcd_cluster, prefix, "target", mem=10 * GIB)
        await target.beat()
        sources = [make(etcd_cluster, prefix, f"src{i}") for i in range(4)]
        for s in sources:
            await s.beat()

        async def one(s: Fleet, i: int) -> str:
            try:
                await s.reserve("target", f"{s.name}-{i}", 2 * GIB, 0)
            except ReservationRefused as exc:
                return f"refused: {exc}"
            return "ok"

        # 12 concurrent asks of 2 GiB (+10% headroom) against 10 GiB: exactly 4 fit.
        results = await asyncio.gather(*(one(s, i) for s in sources for i in range(3)))
        assert results.count("ok") == 4, results
        assert all("not enough memory on target" in r for r in results if r != "ok")
        view = await target.refresh()
        assert view.reserved("target")[0] == 8 * GIB
        # Released reservations give the room back.
        for r in list(view.reservations["target"]):
            await sources[0].release("target", r.mid)
        assert (await target.refresh()).reserved("target") == (0, 0)
        for f in (target, *sources):
            await f.leave()

    run_async(scenario(), timeout=60)


def test_drain_budget_queues_and_a_dead_holder_frees_it(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    async def scenario() -> None:
        h1, h2, h3 = (make(etcd_cluster, prefix, n) for n in ("h1", "h2", "h3"))
        for f in (h1, h2, h3):
            await f.beat()
        await asyncio.gather(h1.enqueue_drain("kernel"), h2.enqueue_drain("kernel"))
        for f in (h1, h2, h3):
            await f.refresh()
        states = {f.name: f.drain_position() for f in (h1, h2)}
        holder = next(n for n, (s, _) in states.items() if s == "draining")
        waiter = next(n for n, (s, _) in states.items() if s == "queued")
        assert states[waiter] == ("queued", [holder])
        fleets = {"h1": h1, "h2": h2}
        # A host queued to drain never receives containers.
        with pytest.raises(ReservationRefused, match="draining or queued"):
            await h3.reserve(waiter, "m1", GIB, 0)
        with pytest.raises(ReservationRefused, match="draining or queued"):
            await h3.reserve(holder, "m2", GIB, 0)
        # The holder's agent dies: its lease expires and the waiter's turn comes.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while fleets[waiter].drain_position()[0] != "draining":
            assert loop.time() < deadline, "the queue did not move after the holder's lease expired"
            await fleets[waiter].beat()
            await asyncio.sleep(0.2)
        await fleets[waiter].dequeue_drain()
        assert fleets[waiter].drain_position() == ("idle", [])
        for f in (fleets[waiter], h3):
            await f.leave()

    run_async(scenario(), timeout=60)


def test_spread_refuses_a_second_replica(etcd_cluster: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        t1 = make(etcd_cluster, prefix, "t1", spread=["web"])
        t2 = make(etcd_cluster, prefix, "t2")
        src = make(etcd_cluster, prefix, "src")
        for f in (t1, t2, src):
            await f.beat()
        with pytest.raises(ReservationRefused, match="already runs a replica of spread 'web'"):
            await src.reserve("t1", "m1", GIB, 0, spread="web")
        await src.reserve("t2", "m2", GIB, 0, spread="web")
        with pytest.raises(ReservationRefused, match="replica of spread 'web' is moving to t2"):
            await src.reserve("t2", "m3", GIB, 0, spread="web")
        await src.reserve("t2", "m4", GIB, 0, spread="db")
        for f in (t1, t2, src):
            await f.leave()

    run_async(scenario())


def test_unreachable_etcd_is_one_clear_line(prefix: str) -> None:
    async def scenario() -> None:
        dead = Etcd(["127.0.0.1:1"], ca=None, cert=None, key=None, timeout=0.5)
        fleet = Fleet(
            dead, name="a", address="127.0.0.1:1", prefix=prefix, lease_ttl=3,
            max_draining_hosts=1,
        )  # fmt: skip
        with pytest.raises(FleetUnavailable) as info:
            await fleet.beat()
        assert str(info.value) == "etcd unavailable (127.0.0.1:1: connection refused)"
        assert not fleet.fresh()
        with pytest.raises(FleetUnavailable, match="not joined the fleet yet"):
            await fleet.reserve("b", "m", 1, 1)

    run_async(scenario())

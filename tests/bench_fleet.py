"""`make bench-fleet`: 200 simulated agents against one local etcd (loopback only, TLS).

No containers: each simulated agent is the real `agent.fleet.Fleet` (lease, record,
fleet read on every beat, reservation transactions), with a synthetic capacity.

Phases:
1. join: every agent grants its lease and publishes its record;
2. steady state: every agent beats every lease_ttl / 3 for STEADY_S seconds;
   reported: etcd requests per second in total and per agent, the CPU the agents
   used (this process, all agents together, divided per agent) and etcd's CPU;
3. reservation storm: every agent reserves on one of a few targets at the same
   moment, several rounds, so the transactions contend; reported: p50 and p99
   latency of one reservation (retries included), conflicts, refusals, and a
   check that no target was ever oversubscribed.

    FERRY_BENCH_AGENTS=200 FERRY_BENCH_STEADY_S=30 make bench-fleet
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.fleet.etcd import Etcd
from agent.fleet.fleet import HEADROOM, Fleet, ReservationRefused
from agent.logging import configure_logging
from tests.etcd_cluster import EtcdCluster, loopback_cluster

AGENTS = int(os.environ.get("FERRY_BENCH_AGENTS", "200"))
STEADY_S = float(os.environ.get("FERRY_BENCH_STEADY_S", "30"))
TTL = 10.0
TARGETS = 10
ROUNDS = 3
GIB = 1 << 30
TARGET_MEM = 16 * GIB
ASK = 2 * GIB  # 7 fit in 16 GiB with 10% headroom: later asks are refused


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fleet(cluster: EtcdCluster, prefix: str, i: int) -> Fleet:
    tls = cluster.tls
    etcd = Etcd(cluster.endpoints, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=5.0)
    record = {
        "mem_available_bytes": TARGET_MEM if i < TARGETS else 64 * GIB,
        "disk_free_bytes": 500 * GIB,
        "running_containers": 20,
        "draining": False,
        "spread": [],
        "in_flight": 0,
    }
    return Fleet(
        etcd,
        name=f"sim{i:04d}",
        address=f"127.0.0.1:{20000 + i}",
        prefix=prefix,
        lease_ttl=TTL,
        max_draining_hosts=1,
        labels={"rack": f"r{i % 20}"},
        version="bench",
        local=lambda: record,
    )


async def _storm(fleets: list[Fleet], sources: list[Fleet], tag: str) -> dict[str, Any]:
    """ROUNDS rounds of every source reserving ASK on target (index mod TARGETS) at once."""
    latencies: list[float] = []
    outcomes = {"ok": 0, "refused": 0}
    conflicts0 = sum(f.reservation_conflicts for f in fleets)
    worst_use = 0.0
    for rnd in range(ROUNDS):

        async def one(f: Fleet, i: int, rnd: int = rnd) -> None:
            start = time.monotonic()
            try:
                await f.reserve(f"sim{i % TARGETS:04d}", f"{tag}{rnd}-{f.name}", ASK, ASK)
                outcomes["ok"] += 1
            except ReservationRefused:
                outcomes["refused"] += 1
            latencies.append(time.monotonic() - start)

        await asyncio.gather(*(one(f, i) for i, f in enumerate(sources)))
        view = await fleets[0].refresh()
        for t in range(TARGETS):
            used, _ = view.reserved(f"sim{t:04d}")
            worst_use = max(worst_use, used * (1 + HEADROOM) / TARGET_MEM)
        # Give the capacity back for the next round.
        held = [r for rs in view.reservations.values() for r in rs]
        await asyncio.gather(*(fleets[0].release(r.target, r.mid) for r in held))
    return {
        "reservations": len(latencies),
        "ok": outcomes["ok"],
        "refused_full": outcomes["refused"],
        "txn_conflicts": sum(f.reservation_conflicts for f in fleets) - conflicts0,
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
        "worst_target_use_with_headroom": round(worst_use, 3),
    }


async def _bench(cluster: EtcdCluster) -> dict[str, Any]:
    # One worker thread per agent: etcd3gw is synchronous, and a real agent has its own.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=AGENTS + 8))
    prefix = f"/bench-{uuid.uuid4().hex[:6]}/"
    fleets = [_fleet(cluster, prefix, i) for i in range(AGENTS)]
    etcd_pid = cluster.members[0].proc.pid if cluster.members[0].proc else 0

    def requests() -> int:
        return sum(f.etcd.requests for f in fleets)

    t0 = time.monotonic()
    await asyncio.gather(*(f.beat() for f in fleets))
    join_s = time.monotonic() - t0
    members = len((await fleets[0].refresh()).members)

    # Steady state: each agent's own loop, started spread over one interval like real hosts.
    async def staggered(f: Fleet, delay: float) -> None:
        await asyncio.sleep(delay)
        await f.run()

    interval = fleets[0].interval
    tasks = [asyncio.create_task(staggered(f, interval * i / AGENTS)) for i, f in enumerate(fleets)]
    await asyncio.sleep(interval * 1.5)  # warm-up: every agent is in its loop
    r0, c0, e0, w0 = requests(), time.process_time(), _cpu_of(etcd_pid), time.monotonic()
    await asyncio.sleep(STEADY_S)
    r1, c1, e1, w1 = requests(), time.process_time(), _cpu_of(etcd_pid), time.monotonic()
    span = w1 - w0
    stale = sum(1 for f in fleets if not f.fresh())

    # Reservation storms, heartbeats going on: many sources ask TARGETS targets at once.
    storms = {
        # 10 hosts draining at once, 2 concurrent migrations each: 2 contenders per target.
        "20_at_once": await _storm(fleets, fleets[TARGETS : TARGETS + 20], "a"),
        # Every other agent at once: 19 contenders per target, most refused (full).
        f"{AGENTS - TARGETS}_at_once": await _storm(fleets, fleets[TARGETS:], "b"),
    }
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for f in fleets:
        await f.leave()
        f.etcd.close()

    return {
        "agents": AGENTS,
        "members_seen": members,
        "lease_ttl_s": TTL,
        "beat_interval_s": round(interval, 2),
        "join_all_s": round(join_s, 2),
        "steady_s": round(span, 1),
        "etcd_requests_per_s": round((r1 - r0) / span, 1),
        "etcd_requests_per_s_per_agent": round((r1 - r0) / span / AGENTS, 3),
        "agents_cpu_core_share_total": round((c1 - c0) / span, 3),
        "agent_cpu_core_share_per_agent": round((c1 - c0) / span / AGENTS, 5),
        "etcd_cpu_core_share": round((e1 - e0) / span, 3),
        "stale_views_at_end_of_steady_state": stale,
        "reservation_storms": storms,
    }


def main() -> int:
    configure_logging("warning", "console")  # 200 agents joining is not news
    cluster = loopback_cluster(1)
    cluster.start()
    try:
        result = asyncio.run(_bench(cluster))
    finally:
        cluster.stop()
    print(json.dumps(result, indent=2))
    storms = result["reservation_storms"].values()
    over = any(st["worst_target_use_with_headroom"] > 1.0 for st in storms)
    ok = not over and result["members_seen"] == AGENTS
    if not ok:
        print("bench-fleet: a target was oversubscribed or members went missing", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

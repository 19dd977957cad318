"""The fleet on the testbed: real agents, real Docker and CRIU, a 3-member etcd cluster
with TLS (Debian's etcd 3.5, one member in each of host1..host3's network namespaces).

One dense run, as an Ansible play would drive it (`ferry drain --wait && upgrade &&
reboot`, then `ferry undrain`), with max_draining_hosts 1:
- host4 has only `fleet:` (no static peers) and nobody lists it: it is discovered and
  receives migrations;
- host1 and host2 run `ferry drain` at the same moment: one evacuates, the other is
  shown queued behind it and moves nothing;
- the etcd member on host3 is killed mid-drain: the drain completes;
- the drained host "reboots" (its agent is killed while it holds the drain slot): its
  lease expires and the queued host evacuates;
- replicas sharing `ferry.spread=web` never land on one host: the last one has nowhere
  to go and `ferry drain --wait` names it (exit 1);
- no container ever lands on a draining or queued host;
- quorum lost: a new drain is refused with one line, nothing running moves, every
  view says STALE; quorum back: the agents rejoin by themselves.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.service.control import ControlClient
from tests.e2e.agents_fixtures import (
    counter_state,
    ferry,
    log_events,
    run_counter,
    where_running,
)
from tests.etcd_cluster import EtcdCluster
from tests.helpers import wait_for
from tests.testbed import faults
from tests.testbed.agents import agents_down, agents_up
from tests.testbed.layout import Host, load_hosts

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]


@pytest.fixture(scope="module")
def four(testbed_hosts: list[Host]) -> list[Host]:
    if len(testbed_hosts) < 4:
        # Growing a healthy testbed keeps the hosts other tests use.
        proc = subprocess.run(
            [sys.executable, "-m", "tests.testbed", "up", "--hosts", "4"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.fail(f"could not grow the testbed to 4 hosts:\n{proc.stderr[-2000:]}")
    return load_hosts()[:4]


@pytest.fixture
def etcd(four: list[Host]) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster([(h.ip, ["nsenter", f"--net={h.netns_path}"]) for h in four[:3]])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def clients4(four: list[Host]) -> Iterator[dict[str, docker.DockerClient]]:
    clients = {h.name: docker.DockerClient(base_url=h.docker_host, timeout=120) for h in four}
    try:
        yield clients
    finally:
        for c in clients.values():
            for ctr in c.containers.list(all=True):
                ctr.remove(force=True)
            c.close()


def status_of(host: Host) -> dict[str, Any]:
    proc = ferry(host, "status", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return dict(json.loads(proc.stdout))


def fleet_status(host: Host) -> dict[str, Any]:
    proc = ferry(host, "fleet", "status", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return dict(json.loads(proc.stdout))


def test_fleet_drains_take_turns_discover_spread_and_survive_faults(
    four: list[Host], etcd: EtcdCluster, clients4: dict[str, docker.DockerClient]
) -> None:
    h1, h2, h3, h4 = four
    by_name = {h.name: h for h in four}
    fleet = {
        "endpoints": etcd.endpoints,
        "ca": str(etcd.tls.ca),
        "cert": str(etcd.tls.cert),
        "key": str(etcd.tls.key),
        "lease_ttl": "3s",
        "request_timeout": "1s",
        "max_draining_hosts": 1,
    }
    # host1..host3 list each other as static peers; host4 is in nobody's list, nor has one.
    agents_up([h1, h2, h3], overrides={"fleet": fleet})
    agents_up([h4], overrides={"fleet": fleet})
    try:
        wait_for(
            lambda: all(
                {x["name"] for x in fleet_status(h)["hosts"] if x["up"]} == set(by_name)
                for h in four
            ),
            timeout=30,
            what="every agent to see all four hosts in the fleet",
        )
        run_counter(clients4[h3.name], "web-0", 8120, **{"ferry.spread": "web"})
        run_counter(clients4[h1.name], "app-1", 8121)
        run_counter(clients4[h1.name], "web-1", 8122, **{"ferry.spread": "web"})
        run_counter(clients4[h2.name], "app-2", 8123)
        run_counter(clients4[h2.name], "web-2", 8124, **{"ferry.spread": "web"})
        before = {
            "app-1": counter_state(h1, h1, 8121, at_least=3),
            "app-2": counter_state(h2, h2, 8123, at_least=3),
        }

        # Both drains at the same moment (the same request `ferry drain` sends, on both
        # control sockets at once, so process start-up does not space them apart).
        async def both() -> list[dict[str, Any]]:
            return list(
                await asyncio.gather(
                    *(ControlClient(Path(h.control_socket)).drain("kernel") for h in (h1, h2))
                )
            )

        said = dict(zip((h1.name, h2.name), asyncio.run(both()), strict=True))
        states = {n: r["fleet"]["state"] for n, r in said.items()}
        assert sorted(states.values()) == ["draining", "queued"], said
        first = by_name[next(n for n, st in states.items() if st == "draining")]
        second = by_name[next(n for n, st in states.items() if st == "queued")]
        assert said[second.name]["fleet"]["queued_behind"] == [first.name]
        shown = ferry(second, "status")
        assert f"queued behind {first.name}" in shown.stdout, shown.stdout

        # The etcd member on host3 dies mid-drain; the drain completes all the same.
        etcd.kill(etcd.members[2])
        waited = ferry(first, "drain", "--wait", "--timeout", "180", timeout=240)
        members = [etcd.running(m) for m in etcd.members]
        assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}etcd up: {members}"
        app_first = f"app-{first.name[-1]}"
        web_first = f"web-{first.name[-1]}"
        assert where_running(clients4, web_first) == [h4.name]  # the discovered host
        landed = where_running(clients4, app_first)
        assert landed and landed[0] in (h3.name, h4.name), landed
        after = counter_state(first, by_name[landed[0]], 8121 if first is h1 else 8123)
        assert after["nonce"] == before[app_first]["nonce"], "moved by restarting, not migrating"
        # Meanwhile the queued host moved nothing.
        assert where_running(clients4, f"app-{second.name[-1]}") == [second.name]
        assert where_running(clients4, f"web-{second.name[-1]}") == [second.name]

        # The first host "reboots" while holding the drain slot: its lease expires, and
        # the queued host evacuates. Its web replica has nowhere to go (web on host3 and
        # host4; host1/host2 draining or gone), and --wait says so.
        faults.kill_agent(first)
        waited = ferry(second, "drain", "--wait", "--timeout", "180", timeout=240)
        assert waited.returncode == 1, waited.stdout + waited.stderr
        web_second = f"web-{second.name[-1]}"
        assert web_second in waited.stderr and "spread" in waited.stderr, waited.stderr
        app_second = f"app-{second.name[-1]}"
        landed2 = where_running(clients4, app_second)
        assert landed2 and landed2[0] in (h3.name, h4.name), (landed2, waited.stderr)
        assert where_running(clients4, web_second) == [second.name]  # still running, here
        webs = [where_running(clients4, f"web-{i}") for i in range(3)]
        assert sorted(w[0] for w in webs) == sorted([h3.name, h4.name, second.name]), webs
        assert all(len(w) == 1 for w in [*webs, landed, landed2])

        # Quorum lost (only the member on host2 left): nothing running moves or is lost,
        # a new drain is refused with one line, every view says STALE.
        running = {n: where_running(clients4, n) for n in (app_first, app_second, web_second)}
        etcd.kill(etcd.members[0])
        live = [h for h in four if h is not first]
        wait_for(
            lambda: all(not fleet_status(h)["fresh"] for h in live),
            timeout=30,
            what="every live agent to see its fleet view go stale",
        )
        refused = ferry(h3, "drain", "--reason", "no quorum")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "drain refused" in lines[0], lines
        assert ferry(h3, "fleet", "status").returncode == 1
        assert not status_of(h3)["draining"]
        assert {n: where_running(clients4, n) for n in running} == running
        # Quorum back: the agents rejoin by themselves.
        etcd.restart(etcd.members[0])
        etcd.restart(etcd.members[2])
        wait_for(
            lambda: all(fleet_status(h)["fresh"] for h in live),
            timeout=60,
            what="every live agent to rejoin the fleet",
        )
        assert ferry(second, "undrain").returncode == 0

        # The "rebooted" host comes back: nothing of its drain is unsettled, it waits in
        # the queue again (refusing containers) until the operator's undrain.
        faults.start_agent(first)
        back = status_of(first)
        assert back["in_doubt"] == [] and back["migrations"] == [], back
        assert back["draining"] is True
        assert ferry(first, "undrain").returncode == 0

        # No reservation, on any host, ever named a host after it asked to drain.
        asked = {
            h.name: min(e["timestamp"] for e in log_events(h, "agent.fleet_drain_requested"))
            for h in (h1, h2)
        }
        for h in four:
            for ev in log_events(h, "fleet.reserved"):
                since = asked.get(ev["target"])
                assert since is None or ev["timestamp"] < since, (h.name, ev, asked)
    finally:
        agents_down(four)
        for h in four:
            # Like the drain marker (agents_up removes it), a fleet drain must not leak out.
            Path(h.state_dir, "fleet-drain-request").unlink(missing_ok=True)

"""Three assembled agents on one real etcd (fake Docker and engine): discovery with only
`fleet:`, two drains at once under max_draining_hosts 1, reservations through the
agent's migrator, `ferry drain --wait`, `ferry status` and `ferry fleet status`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.ops_cmds import wait_until_drained
from agent.fleet.runtime import load_known
from agent.service.control import ControlClient
from agent.service.runtime import serve
from tests.etcd_cluster import EtcdCluster
from tests.fleet.fleet_agents import HOSTS, Fixture, cli, container, fleet_env, make_agent, until
from tests.helpers import run_async


@pytest.fixture
def fx(tmp_path: Path, etcd_cluster: EtcdCluster, prefix: str) -> Iterator[Fixture]:
    with fleet_env(tmp_path, etcd_cluster, prefix) as env:
        yield env


def test_two_drains_at_once_take_turns_and_nothing_lands_on_a_draining_host(
    fx: Fixture,
) -> None:
    world = fx.world
    world.containers["h1"] = [container("a1"), container("a2", **{"ferry.spread": "web"})]
    world.containers["h2"] = [container("b1"), container("b2", **{"ferry.spread": "web"})]

    async def scenario() -> None:
        stops = {h: asyncio.Event() for h in HOSTS}
        tasks = {}
        for host in HOSTS:
            world.agents[host] = make_agent(fx, host)
            tasks[host] = asyncio.create_task(serve(world.agents[host], stops[host]))
        try:
            clients = {h: ControlClient(world.agents[h].config.control_socket) for h in HOSTS}
            await until(lambda: all(a.control is not None for a in world.agents.values()), 20, "up")
            world.publish()

            # Discovery: no static peers anywhere, yet every agent knows the other two.
            async def knows_all() -> bool:
                for h in HOSTS:
                    names = {p["name"] for p in (await clients[h].status())["peers"]}
                    if names != set(HOSTS) - {h}:
                        return False
                return True

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while not await knows_all():
                assert loop.time() < deadline, "agents did not discover each other"
                await asyncio.sleep(0.2)

            # What etcd taught each agent is kept on its disk, for a restart without etcd.
            for h in HOSTS:
                state_dir = world.agents[h].config.state_dir
                await until(
                    lambda d=state_dir, h=h: set(load_known(d)) == set(HOSTS) - {h},
                    10,
                    f"{h} to save the peers it discovered",
                )

            # Hold the first evacuation mid-flight, so both drains overlap for sure.
            world.gate = asyncio.Event()
            r1, r2 = await asyncio.gather(
                clients["h1"].drain("kernel"), clients["h2"].drain("kernel")
            )
            states = {"h1": r1["fleet"]["state"], "h2": r2["fleet"]["state"]}
            assert sorted(states.values()) == ["draining", "queued"], states
            first = next(h for h, s in states.items() if s == "draining")
            second = next(h for h, s in states.items() if s == "queued")
            queued = (await clients[second].status())["fleet"]["drain"]
            assert queued["state"] == "queued" and queued["queued_behind"] == [first]
            out = await asyncio.to_thread(cli, "status", "--config", str(fx.configs[second]))
            assert f"queued behind {first}" in out.output, out.output
            assert world.agents[second].draining()  # refuses incoming while queued

            await until(lambda: len(world.moves) >= 1, 20, f"{first} to start evacuating")
            assert all(m[1] == first for m in world.moves)
            world.gate.set()
            # `ferry drain --wait` on the first host returns once it is empty.
            assert await asyncio.wait_for(wait_until_drained(clients[first], 30), 40) == 0
            assert world.containers[first] == []
            # The queued host has not moved anything while the first one drained.
            assert not any(m[1] == second for m in world.moves)

            # Like the Ansible play: the first host is done (upgrade, reboot), then undrains.
            await clients[first].undrain()
            assert await asyncio.wait_for(wait_until_drained(clients[second], 30), 40) == 0

            for name, source, target, draining in world.moves:
                assert target not in draining, f"{name}: {source} -> {target} while {draining}"
                assert target != source
            # Spread: the two "web" replicas never share a host.
            webs = [h for h in HOSTS for c in world.containers[h] if c.labels.get("ferry.spread")]
            assert len(webs) == 2 and len(set(webs)) == 2, world.containers

            fleet = (await clients["h3"].status())["fleet"]
            assert fleet["fresh"] and {h["name"] for h in fleet["hosts"] if h["up"]} == set(HOSTS)
            out = await asyncio.to_thread(cli, "fleet", "status", "--config", str(fx.configs["h3"]))
            assert out.exit_code == 0 and "rack=r3" in out.output, out.output
            await clients[second].undrain()
        finally:
            if world.gate is not None:
                world.gate.set()
            for h in HOSTS:
                stops[h].set()
            codes = await asyncio.gather(*tasks.values())
        assert codes == [0, 0, 0]

    run_async(scenario(), timeout=150)

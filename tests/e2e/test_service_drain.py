"""Ferry as a service, end to end on three testbed hosts with real agents.

Drain evacuates exactly the opted-in containers with their state, a draining
host refuses incoming migrations until undrained, a CPU-pressure policy moves
one container and then cools down, and a dry-run policy moves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.agents_fixtures import (
    counter_state,
    ferry,
    log_events,
    run_counter,
    running_agents,
    status,
    where_running,
)
from tests.helpers import wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

MAINTENANCE = (Path(__file__).resolve().parents[2] / "policies" / "maintenance.yaml").read_text()


@pytest.fixture
def three(testbed_hosts):
    if len(testbed_hosts) < 3:
        pytest.fail("these tests need 3 testbed hosts: `python -m tests.testbed up --hosts 3`")
    return testbed_hosts[:3]


def test_drain_evacuates_opted_in_and_refuses_incoming(three, docker_clients, clean_containers):
    h1, h2, h3 = three
    c1 = docker_clients[h1.name]
    policies = {h.name: {"maintenance.yaml": MAINTENANCE} for h in three}
    with running_agents(three, policies):
        movers = {f"evac-{i}": 8090 + i for i in range(3)}
        for name, port in movers.items():
            run_counter(c1, name, port)
        run_counter(c1, "stay-put", 8099, opted_in=False)
        stay_id = c1.containers.get("stay-put").id
        before = {n: counter_state(h1, h1, p, at_least=5) for n, p in movers.items()}

        assert ferry(h1, "drain", "--reason", "e2e maintenance").returncode == 0

        def moved() -> dict[str, list[str]] | None:
            # One snapshot, judged as a whole (two looks could straddle a retry).
            now = {n: where_running(docker_clients, n) for n in movers}
            return now if all(w and w[0] != h1.name for w in now.values()) else None

        placed = wait_for(
            moved, timeout=240, what="all three opted-in containers to run on other hosts"
        )
        # Each runs exactly once, on host2 or host3, and the work is spread.
        assert all(len(w) == 1 and w[0] in (h2.name, h3.name) for w in placed.values()), placed
        assert {w[0] for w in placed.values()} == {h2.name, h3.name}, placed
        by_name = {h.name: h for h in three}
        for name, port in movers.items():
            after = counter_state(h1, by_name[placed[name][0]], port)
            assert after["nonce"] == before[name]["nonce"], f"{name} restarted instead of moving"
            assert after["counter"] >= before[name]["counter"]
            assert after["lines"] >= before[name]["lines"]
        stay = c1.containers.get("stay-put")
        assert stay.id == stay_id and stay.status == "running", "a non-opted-in container moved"
        evac = wait_for(
            lambda: (s := status(h1)["evacuation"]) and s.get("state") == "done" and s,
            timeout=60,
            what="host1 to report the evacuation done",
        )
        assert len(evac["done"]) >= 3

        # While host1 drains, a migration towards it is refused, with the reason.
        back = next(n for n in movers if placed[n][0] == h2.name)
        refused = ferry(h2, "migrate", back, "--to", h1.name)
        assert refused.returncode != 0
        assert "drain" in (refused.stdout + refused.stderr).lower()
        assert where_running(docker_clients, back) == [h2.name]

        assert ferry(h1, "undrain").returncode == 0
        wait_for(lambda: not status(h1)["draining"], timeout=30, what="host1 to stop draining")
        accepted = ferry(h2, "migrate", back, "--to", h1.name)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert where_running(docker_clients, back) == [h1.name]


CPU_POLICY = """
policies:
  - name: e2e-cpu
    when: {signal: load.1, op: ">", value: %(threshold)s}
    for: 5s
    cooldown: 10m
    order: priority
    amount: 1
    action: move
    targets: {peers: any, placement: least_loaded}
"""


def _burn_cpu() -> list[subprocess.Popen[bytes]]:
    loop = "import time\nwhile True: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(3)]


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_cpu_pressure_moves_one_then_cools_down(three, docker_clients, clean_containers):
    h1 = three[0]
    c1 = docker_clients[h1.name]
    # The containers exist and the burners run before the agent starts: load is
    # machine-wide, so on a busy machine the condition may already hold, and the
    # test must not depend on catching the moment it first becomes true.
    run_counter(c1, "cpu-a", 8101, **{"ferry.priority": "1"})
    run_counter(c1, "cpu-b", 8102, **{"ferry.priority": "5"})
    counter_state(h1, h1, 8101, at_least=3)
    counter_state(h1, h1, 8102, at_least=3)
    burners = _burn_cpu()
    policies = {h1.name: {"cpu.yaml": CPU_POLICY % {"threshold": "0.5"}}}
    policies.update({h.name: {} for h in three[1:]})
    try:
        with running_agents(three, policies):
            pending = wait_for(
                lambda: log_events(h1, "policy.pending", "e2e-cpu"),
                timeout=120,
                what="the policy to go pending",
            )[0]
            firing = wait_for(
                lambda: log_events(h1, "policy.firing", "e2e-cpu"),
                timeout=120,
                what="the policy to fire",
            )[0]
            # `for: 5s`: it fires only once the pressure has held for the hold time.
            assert _ts(firing) - _ts(pending) >= 5.0 - 0.1
            # The lowest-priority container goes, and runs exactly once, elsewhere.
            placed = wait_for(
                lambda: (w := where_running(docker_clients, "cpu-a")) and h1.name not in w and w,
                timeout=120,
                what="cpu-a to run on another host",
            )
            assert len(placed) == 1
            # Pressure holds; the engine says it is cooling down and skips, and nothing else moves.
            wait_for(
                lambda: [
                    e
                    for e in log_events(h1, "policy.skipped", "e2e-cpu")
                    if e.get("skip_reason") == "cooldown"
                ],
                timeout=60,
                what="a cooldown skip while pressure holds",
            )
            assert where_running(docker_clients, "cpu-b") == [h1.name]
            assert len(log_events(h1, "policy.acting", "e2e-cpu")) == 1
    finally:
        for b in burners:
            b.kill()
            b.wait()


DRY_RUN_POLICY = """
policies:
  - name: e2e-dry
    when: {marker: drain, present: true}
    dry_run: true
    amount: all
    action: evacuate
    targets: {peers: any}
"""


def test_dry_run_policy_logs_and_moves_nothing(three, docker_clients, clean_containers):
    h1 = three[0]
    c1 = docker_clients[h1.name]
    policies = {h1.name: {"dry.yaml": DRY_RUN_POLICY}}
    policies.update({h.name: {} for h in three[1:]})
    with running_agents(three, policies):
        run_counter(c1, "dry-a", 8111)
        counter_state(h1, h1, 8111, at_least=2)
        assert ferry(h1, "drain", "--reason", "dry run").returncode == 0
        skipped = wait_for(
            lambda: [
                e
                for e in log_events(h1, "policy.skipped", "e2e-dry")
                if e.get("skip_reason") == "dry_run"
            ],
            timeout=60,
            what="the dry-run policy to log what it would do",
        )
        assert "dry-a" in str(skipped[0])
        assert where_running(docker_clients, "dry-a") == [h1.name]
        # The journal outlives agents (earlier tests' moves are in it): none may be dry-a.
        history = json.loads(ferry(h1, "history", "--json").stdout or "[]")
        assert not [m for m in history if m.get("container_name") == "dry-a"]
        assert ferry(h1, "undrain").returncode == 0

"""`make bench`: Ferry against the manual procedure, side by side in one run.

For each workload the same container is moved host1 -> host2 three times: by
the manual procedure operators use today (checkpoint, tar, copy over the
network, untar, create, start from the checkpoint; tests/testbed/manual.py),
by `ferry migrate` with the default `migration.checkpoint_via: engine`, and by
`ferry migrate` after restarting the agents with `checkpoint_via: runc`.
Downtime is freeze -> running on the target. The ratios are what the benchmark
reports; absolute times depend on the machine.

It also measures the agent's idle cost: CPU time used by an idle `ferry run`
over a fixed window, as a share of one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import docker

from tests.testbed import load_hosts
from tests.testbed.agents import agents_down, agents_up
from tests.testbed.layout import Host
from tests.testbed.manual import ManualTimings, move_by_hand
from tests.testbed.procs import alive, netns_argv

IDLE_WINDOW = float(os.environ.get("FERRY_BENCH_IDLE_SECONDS", "20"))
RUNC = {"migration": {"checkpoint_via": "runc"}}
WORKLOADS = [
    ("counter", "ferry-test/counter:1", {}, {"8080/tcp": 8080}),
    ("memhog-256MiB", "ferry-test/memhog:1", {"MEMHOG_MIB": "256"}, {}),
]


@dataclass
class Result:
    downtime: float
    total: float
    bytes: int


def _wait_running(client: docker.DockerClient, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.containers.list(filters={"name": f"^{name}$", "status": "running"})
        if found:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: {name} is not running within {timeout}s")


def _settle(client: docker.DockerClient, name: str, image: str) -> None:
    # memhog prints its first checksum once its memory is filled.
    if "memhog" in image:
        deadline = time.monotonic() + 120
        while b"checksum=" not in client.containers.get(name).logs():
            if time.monotonic() > deadline:
                raise SystemExit("bench: memhog never filled its memory")
            time.sleep(0.2)
    else:
        time.sleep(1.0)  # a second of ticks in the writable layer, as in real use


def _run(client: docker.DockerClient, name: str, image: str, env: dict, ports: dict) -> None:
    client.containers.run(
        image, name=name, detach=True, environment=env, ports=ports,
        labels={"ferry.migrate": "true"},
    )  # fmt: skip
    _wait_running(client, name)
    _settle(client, name, image)


def manual(h1: Host, h2: Host, clients: dict, name: str, image: str, env: dict, ports: dict):  # type: ignore[no-untyped-def]
    c1 = clients[h1.name]
    _run(c1, name, image, env, ports)
    t = ManualTimings()
    start = time.monotonic()
    host_config = c1.api.create_host_config(
        port_bindings={int(p.split("/")[0]): hp for p, hp in ports.items()}
    )
    move_by_hand(
        h1, h2, clients, name,
        {"environment": env, "ports": [int(p.split("/")[0]) for p in ports],
         "host_config": host_config},
        timings=t, over_network=True,
    )  # fmt: skip
    _wait_running(clients[h2.name], name)
    return Result(t.downtime, time.monotonic() - start, t.archive_bytes)


def ferry_move(h1: Host, h2: Host, clients: dict, name: str, image: str, env: dict, ports: dict):  # type: ignore[no-untyped-def]
    _run(clients[h1.name], name, image, env, ports)
    assert h1.agent_config
    cmd = netns_argv(
        h1,
        ["ferry", "migrate", name, "--to", h2.name, "--json"],
        {"FERRY_CONFIG": h1.agent_config},
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: ferry migrate failed:\n{proc.stdout}\n{proc.stderr}")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    report = next(x for x in reversed(lines) if x.get("type") == "result")["report"]
    _wait_running(clients[h2.name], name)
    # The agent's own total, like the manual one: no CLI process start-up in it.
    via = report.get("details", {}).get("checkpoint_via", "engine")
    freeze = float(report.get("phases", {}).get("freeze", 0.0))
    print(f"bench: {name}: checkpoint via {via}, freeze {freeze:.2f}s", flush=True)
    return Result(float(report["downtime_s"]), float(report["total_s"]), int(report["bytes_moved"]))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cost(hosts: list[Host]) -> dict[str, float]:
    before = {h.name: _cpu_seconds(h.agent_pid) for h in hosts}
    time.sleep(IDLE_WINDOW)  # the measurement window itself, not a synchronisation
    return {h.name: (_cpu_seconds(h.agent_pid) - before[h.name]) / IDLE_WINDOW * 100 for h in hosts}


def _clean(clients: dict) -> None:
    for c in clients.values():
        for cont in c.containers.list(all=True):
            cont.remove(force=True)


def main() -> int:
    started_testbed = not load_hosts()
    if started_testbed:
        subprocess.run([sys.executable, "-m", "tests.testbed", "up", "--hosts", "2"], check=True)
    hosts = load_hosts()
    h1, h2 = hosts[0], hosts[1]
    started_agents = not all(alive(h.agent_pid) for h in hosts)
    clients = {h.name: docker.DockerClient(base_url=h.docker_host, timeout=300) for h in hosts}
    rows: list[tuple[str, Result, Result, Result]] = []
    try:
        if started_agents:
            agents_up(hosts)
        _clean(clients)
        idle = idle_cost(hosts)
        engine: dict[str, tuple[Result, Result]] = {}
        for label, image, env, ports in WORKLOADS:
            m = manual(h1, h2, clients, f"bench-{label}-manual", image, env, ports)
            _clean(clients)
            f = ferry_move(h1, h2, clients, f"bench-{label}-ferry", image, env, ports)
            _clean(clients)
            engine[label] = (m, f)
        # The same moves with the agents freezing through dockerd's runc.
        agents_down(hosts)
        agents_up(hosts, overrides=RUNC)
        for label, image, env, ports in WORKLOADS:
            r = ferry_move(h1, h2, clients, f"bench-{label}-runc", image, env, ports)
            _clean(clients)
            rows.append((label, *engine[label], r))
        agents_down(hosts)
        if not started_agents:
            agents_up(hosts)  # leave agents running, on the default config
    finally:
        _clean(clients)
        for c in clients.values():
            c.close()
        if started_agents:
            agents_down(hosts)
        if started_testbed:
            subprocess.run([sys.executable, "-m", "tests.testbed", "down"], check=False)

    print("\nFerry vs the manual procedure (host1 -> host2, same run, same machine)")
    print("engine: checkpoint_via engine (Docker's API); runc: checkpoint_via runc")
    head = f"{'workload':16} {'':8} {'manual':>9} {'engine':>9} {'runc':>9}"
    print(f"{head} {'manual/engine':>14} {'manual/runc':>12} {'engine/runc':>12}")
    for label, m, f, r in rows:
        for what, a, b, c in (
            ("downtime", m.downtime, f.downtime, r.downtime),
            ("total", m.total, f.total, r.total),
        ):
            print(
                f"{label:16} {what:8} {a:8.2f}s {b:8.2f}s {c:8.2f}s"
                f" {a / b:13.2f}x {a / c:11.2f}x {b / c:11.2f}x"
            )
        print(f"{label:16} {'bytes':8} {m.bytes:9d} {f.bytes:9d} {r.bytes:9d}")
    print(f"\nAgent idle cost over {IDLE_WINDOW:.0f}s (share of one core):")
    for name, pct in idle.items():
        print(f"  {name}: {pct:.2f}%  ({'OK' if pct < 1.0 else 'OVER'} the 1% goal)")
    return 0 if all(p < 1.0 for p in idle.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

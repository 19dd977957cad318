"""`make demo`: drain a host and watch a stateful container carry on elsewhere.

1. bring up the two-host testbed (Docker + CRIU in namespaces);
2. start a ferry agent on each host, with certificates from a fresh CA;
3. run ferry-test/counter:1 on host1, opted in with ferry.migrate=true;
4. `ferry drain` on host1 (the maintenance marker);
5. show the agent evacuating the container;
6. show the counter going on from host2, and the migration report;
7. tear down what the demo started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import docker

from tests.testbed import http_get_json, load_hosts
from tests.testbed.agents import agents_down, agents_up
from tests.testbed.layout import Host
from tests.testbed.procs import alive, netns_argv

NAME = "demo-counter"
COUNTER = "ferry-test/counter:1"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def ferry(host: Host, *args: str, check: bool = True, quiet: bool = False) -> str:
    assert host.agent_config
    cmd = netns_argv(host, ["ferry", *args], {"FERRY_CONFIG": host.agent_config})
    print(f"[{host.name}]$ ferry {' '.join(args)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stderr if quiet else proc.stdout + proc.stderr
    if out.strip():
        print("   " + out.strip().replace("\n", "\n   "), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"ferry {args[0]} failed on {host.name} (exit {proc.returncode})")
    return proc.stdout


def follow_log(host: Host, offset: int) -> int:
    """Print the agent's decision and migration events since `offset`; return the new offset."""
    path = Path(host.agent_log)
    data = path.read_bytes()[offset:]
    for line in data.decode(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        name = str(ev.get("event", ""))
        if name.startswith(("policy.", "migration.", "evacuation.")):
            extra = {
                k: v for k, v in ev.items() if k not in ("event", "timestamp", "level", "logger")
            }
            print(
                f"   [{host.name} agent] {name} {json.dumps(extra, default=str)[:300]}", flush=True
            )
    return offset + len(data)


def _remove_everywhere(clients: dict[str, docker.DockerClient]) -> None:
    for c in clients.values():
        for old in c.containers.list(all=True, filters={"name": NAME}):
            old.remove(force=True)


def main() -> int:
    started_testbed = not load_hosts()
    if started_testbed:
        say("bringing up the two-host testbed")
        subprocess.run([sys.executable, "-m", "tests.testbed", "up", "--hosts", "2"], check=True)
    hosts = load_hosts()
    h1, peers = hosts[0], hosts[1:]
    started_agents = not all(alive(h.agent_pid) for h in hosts)
    clients = {h.name: docker.DockerClient(base_url=h.docker_host) for h in hosts}
    c1 = clients[h1.name]
    try:
        if started_agents:
            say("starting a ferry agent on each host (mutual TLS, testbed CA)")
            agents_up(hosts)
        say(f"running {COUNTER} on {h1.name}, opted in with ferry.migrate=true")
        _remove_everywhere(clients)
        c1.containers.run(
            COUNTER,
            name=NAME,
            detach=True,
            ports={"8080/tcp": 8080},
            labels={"ferry.migrate": "true"},
        )
        url1 = f"http://{h1.ip}:8080/"
        deadline = time.monotonic() + 30
        while True:
            try:
                before = http_get_json(h1, url1)
                if before["counter"] >= 15:
                    break
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the counter did not start on host1")
            time.sleep(0.5)
        print(f"   counter on {h1.name}: {before}")

        say(f"maintenance: dropping the drain marker on {h1.name}")
        offset = Path(h1.agent_log).stat().st_size
        ferry(h1, "drain", "--reason", "demo: kernel upgrade")

        say(f"the {h1.name} agent evacuates every opted-in container")
        deadline = time.monotonic() + 120
        h2 = None
        while h2 is None:
            offset = follow_log(h1, offset)
            arrived = [
                p
                for p in peers
                if clients[p.name].containers.list(filters={"name": NAME, "status": "running"})
            ]
            if arrived:
                h2 = arrived[0]
            elif time.monotonic() > deadline:
                raise SystemExit(f"{NAME} did not arrive on any peer within 120 s")
            else:
                time.sleep(0.3)
        follow_log(h1, offset)

        say(f"the counter goes on from {h2.name}, reached from {h1.name}'s network")
        url2 = f"http://{h2.ip}:8080/"
        after = http_get_json(h1, url2)
        print(f"   counter on {h2.name}: {after}")
        same = after["nonce"] == before["nonce"] and after["counter"] >= before["counter"]
        verdict = "continued" if same else "RESTARTED"
        print(
            f"   counter {verdict}: {before['counter']} on {h1.name} -> {after['counter']} on"
            f" {h2.name}; file lines {before['lines']} -> {after['lines']}; same process"
            f" nonce {after['nonce'] == before['nonce']}"
        )
        # The source copy goes in the migration's last phase, just after the target
        # runs it (frozen in place until then, it takes a moment to remove).
        deadline = time.monotonic() + 30
        while (left := c1.containers.list(all=True, filters={"name": NAME})) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        print(f"   {h1.name} still has {NAME}: {bool(left)}")

        say("the migration report, as recorded on the source (`ferry history`)")
        record = json.loads(ferry(h1, "history", "--limit", "1", "--json", quiet=True))[0]
        rep = record["report"]
        print(f"   {rep['container']}: {rep['source']} -> {rep['target']}, {rep['outcome']}")
        print(f"   downtime {rep['downtime_s']:.2f} s (freeze -> running on {rep['target']})")
        print(f"   total    {rep['total_s']:.2f} s")
        print(
            f"   moved    {rep['bytes_moved']} bytes ({rep['bytes_state_raw']} before compression)"
        )
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in rep["phases"].items())
        print(f"   phases   {phases}")
        ferry(h1, "undrain")
        return 0 if same and not left else 1
    finally:
        _remove_everywhere(clients)
        for c in clients.values():
            c.close()
        if started_agents:
            agents_down(hosts)
        if started_testbed:
            say("tearing down the testbed")
            subprocess.run([sys.executable, "-m", "tests.testbed", "down"], check=False)


if __name__ == "__main__":
    sys.exit(main())

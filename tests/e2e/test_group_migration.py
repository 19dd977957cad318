"""A compose-labelled stack moves as a unit, network and aliases included.

Two containers of one compose project talk over a user-defined network that
exists only on the source. After `ferry migrate` of one of them, both run on
the target, the network exists there with the same settings, and the app still
reaches its cache by its alias: the same cache process, with its memory.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest

from agent.migration import held
from tests.e2e.agents_fixtures import counter_state
from tests.e2e.migration_support import (
    COUNTER,
    Gate,
    container_or_none,
    engine_agents,
    ferry_migrate,
    migrate_in_background,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed import kill_dockerd, start_dockerd
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

NET = "ferry-stk-net"
SUBNET = "172.29.77.0/24"
PROJECT = "ferrystk"
PORT = 18090
NAMES = ("stk-app", "stk-cache")

# Run inside the app container's network namespace: ask Docker's embedded DNS
# (127.0.0.11, only there) for the alias, then GET the counter at that address.
_PROBE = r"""
import json, socket, struct, sys, urllib.request
name, port = sys.argv[1], int(sys.argv[2])
q = struct.pack(">HHHHHH", 0x4654, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, ("127.0.0.11", 53))
data, _ = s.recvfrom(2048)
ancount = struct.unpack(">H", data[6:8])[0]
i = len(q)
for _ in range(ancount):
    i += 2 if data[i] & 0xC0 == 0xC0 else data.index(b"\0", i) + 1 - i
    rtype, _, _, rdlen = struct.unpack(">HHIH", data[i:i + 10])
    i += 10
    if rtype == 1 and rdlen == 4:
        ip = socket.inet_ntoa(data[i:i + 4])
        with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=3) as r:
            print(json.dumps({"ip": ip, "state": json.load(r)}))
        sys.exit(0)
    i += rdlen
sys.exit(f"no A record for {name}")
"""


@pytest.fixture(scope="module")
def agents(testbed_hosts: list[Host]) -> Iterator[list[Host]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts):
        yield hosts


@pytest.fixture
def stack(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[dict[str, Any]]:
    h1, _ = agents
    c1 = docker_clients[h1.name]
    c1.networks.create(
        NET,
        driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=SUBNET)]),
        labels={"com.docker.compose.project": PROJECT},
    )
    labels = {"com.docker.compose.project": PROJECT, "ferry.migrate": "true"}
    for name, alias, ports in (
        ("stk-cache", "cache", None),
        ("stk-app", "app", {"8080/tcp": PORT}),
    ):
        c = c1.containers.create(
            COUNTER, name=name, detach=True, ports=ports, labels=labels, network=NET
        )
        c1.networks.get(NET).disconnect(c)
        c1.networks.get(NET).connect(c, aliases=[alias])
        c.start()
    yield {"app": counter_state(h1, h1, PORT, at_least=3)}
    for client in docker_clients.values():
        for name in NAMES:
            c = container_or_none(client, name)
            if c is not None:
                c.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.networks.get(NET).remove()


def _probe_from(client: docker.DockerClient, container: str, alias: str) -> dict[str, Any]:
    """Resolve `alias` and GET it, from inside `container`'s network namespace."""
    cid = client.containers.get(container).id
    pid = held.container_processes(cid)[0].pid
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", _PROBE, alias, "8080"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_a_compose_stack_moves_together_and_keeps_talking_by_alias(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], stack: dict[str, Any]
) -> None:
    h1, h2 = agents
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    before = _probe_from(c1, "stk-app", "cache")["state"]
    assert NET not in {n.name for n in c2.networks.list()}

    code, lines, err = ferry_migrate(h1, "stk-app", h2.name)
    assert code == 0, err
    report = result_of(lines)["report"]
    assert report["details"]["member_outcomes"] == {
        "stk-app": "succeeded",
        "stk-cache": "succeeded",
    }

    assert [container_or_none(c1, n) for n in NAMES] == [None, None]
    assert all(c2.containers.get(n).status == "running" for n in NAMES)
    net = c2.networks.get(NET)
    assert net.attrs["IPAM"]["Config"][0]["Subnet"] == SUBNET
    assert net.attrs["Labels"]["com.docker.compose.project"] == PROJECT
    # The app reaches its cache by alias: the same cache process, further on.
    after = wait_for(
        lambda: (
            (p := _probe_from(c2, "stk-app", "cache"))
            and p["state"]["counter"] > before["counter"]
            and p
        ),
        timeout=30,
        what="the app to reach its cache by alias on the target",
    )
    assert after["state"]["nonce"] == before["nonce"], "a fresh cache answered"
    app = counter_state(h1, h2, PORT, at_least=stack["app"]["counter"])
    assert app["nonce"] == stack["app"]["nonce"], "a fresh app answered"


def test_a_failure_inside_a_group_rolls_every_member_back(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], stack: dict[str, Any]
) -> None:
    h1, h2 = agents
    c1 = docker_clients[h1.name]
    before = _probe_from(c1, "stk-app", "cache")["state"]
    try:
        # The target's daemon dies at the first member's restore: the whole group comes back.
        with Gate(h2, "before-restore") as gate:
            proc = migrate_in_background(h1, "stk-app", h2.name)
            gate.wait()
            kill_dockerd(h2)  # the restore fails; nothing of the group may survive on h2
        _, err = proc.communicate(timeout=300)
        code = proc.returncode
    finally:
        start_dockerd(h2)
    assert code == 1, err
    assert "rolled back" in err
    assert all(c1.containers.get(n).status == "running" for n in NAMES)
    c2 = docker.DockerClient(base_url=h2.docker_host, timeout=120)
    wait_for(
        lambda: (
            [container_or_none(c2, n) for n in NAMES] == [None, None]
            and NET not in {n.name for n in c2.networks.list()}
        ),
        timeout=90,
        what="the target to remove every member and the network it made",
    )
    after = _probe_from(c1, "stk-app", "cache")["state"]
    assert after["nonce"] == before["nonce"] and after["counter"] >= before["counter"]

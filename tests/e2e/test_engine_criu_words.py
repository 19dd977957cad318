"""`checkpoint_via: engine` and a connected client: refused in CRIU's own words, nothing lost.

Docker's checkpoint API passes CRIU no options, so a container with an
established TCP connection cannot be dumped. The failure must quote CRIU's
first real error line and a log this agent can read, and the container must
run on untouched (no restart, the same process, the client still connected).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.e2e.migration_support import (
    Agents,
    container_or_none,
    engine_agents,
    ferry_migrate,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed.layout import Host
from tests.testbed.procs import netns_argv
from tests.testbed.service_images import SERVICES, ensure_service_image

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

NAME = "engine-conn"
PORT = 16390
# One Redis client that connects, is answered, and keeps its connection open.
HOLD = (
    "import socket, sys, time\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
    "s.sendall(b'PING\\r\\n')\n"
    "assert s.recv(16) == b'+PONG\\r\\n'\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def _run_id(container: docker.models.containers.Container) -> str:
    rc, out = container.exec_run(["redis-cli", "INFO", "server"])
    text = out.decode()
    return text.split("run_id:")[1].split()[0] if rc == 0 and "run_id:" in text else ""


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    hosts = testbed_hosts[:2]
    ensure_service_image(hosts)
    with engine_agents(hosts, migration={"checkpoint_via": "engine"}) as agents:
        yield hosts, agents


@pytest.fixture
def no_leftover(docker_clients: dict[str, docker.DockerClient]) -> Iterator[None]:
    def remove() -> None:
        for client in docker_clients.values():
            c = container_or_none(client, NAME)
            if c is not None:
                c.remove(force=True)

    remove()
    yield
    remove()


def test_engine_checkpoint_of_a_connected_container_quotes_criu(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    no_leftover: None,
) -> None:
    (h1, h2), _ = cluster
    client = docker_clients[h1.name]
    redis = client.containers.run(
        SERVICES, ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"],
        name=NAME, detach=True, ports={"6379/tcp": PORT}, labels={"ferry.migrate": "true"},
    )  # fmt: skip
    wait_for(lambda: _run_id(redis), timeout=30, what="redis to answer")
    hold = subprocess.Popen(
        netns_argv(h2, [sys.executable, "-c", HOLD, h1.ip, str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        before = _run_id(redis)
        assert hold.stdout and hold.stdout.readline().strip() == "held"
        rc, lines, err = ferry_migrate(h1, NAME, h2.name)
        result = result_of(lines)
        message = result.get("reason") or result.get("error") or err
        assert rc == 1, (rc, result, err)
        print(f"engine refusal: {message}")
        first = (
            "CRIU: Error (criu/sk-inet.c:200): inet: Connected TCP socket, "
            "consider using --tcp-established option."
        )
        assert first in str(result) or first in err, (result, err)
        m = re.search(r"\(log (/\S+\.dump\.log)\)", str(result) + err)
        assert m, message
        kept = Path(m.group(1))
        assert kept.is_relative_to(Path(h1.state_dir)), kept
        assert "Connected TCP socket" in kept.read_text()

        c = client.containers.get(NAME)
        assert c.status == "running" and c.attrs["RestartCount"] == 0
        assert _run_id(c) == before, "not the same process"
        assert container_or_none(docker_clients[h2.name], NAME) is None
        assert hold.poll() is None, "the held connection was dropped"
    finally:
        hold.kill()
        hold.wait()

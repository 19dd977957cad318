"""pytest fixtures for the Docker+CRIU testbed.

Tests that need it are marked `testbed` and take `testbed_hosts`. When the
machine cannot run the testbed they FAIL with one message saying why: a
silently skipped end-to-end suite would look green while proving nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import docker
import pytest

from tests.testbed.layout import Host, load_hosts

_UP_HINT = "`make testbed-up` (or `python -m tests.testbed up`)"


def _bring_up(count: int) -> list[Host]:
    from tests.testbed.hosts import healthy, preflight

    why = preflight()
    if why:
        pytest.fail(f"testbed cannot run on this machine: {why}", pytrace=False)
    hosts = load_hosts()
    if len(hosts) >= count and all(healthy(h) for h in hosts):
        return hosts
    # Bring it up on demand so a plain `pytest` works too; `make test` does it first.
    proc = subprocess.run(
        [sys.executable, "-m", "tests.testbed", "up", "--hosts", str(max(count, len(hosts), 2))],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"testbed failed to come up with {_UP_HINT}:\n{proc.stderr[-3000:]}", pytrace=False
        )
    return load_hosts()


@pytest.fixture(scope="session")
def testbed_hosts() -> list[Host]:
    """The running testbed's hosts (3 unless FERRY_TESTBED_HOSTS says otherwise)."""
    return _bring_up(int(os.environ.get("FERRY_TESTBED_HOSTS", "3")))


@pytest.fixture(scope="session")
def docker_clients(testbed_hosts: list[Host]) -> Iterator[dict[str, docker.DockerClient]]:
    """One Docker SDK client per host, keyed by host name."""
    clients = {
        h.name: docker.DockerClient(base_url=h.docker_host, timeout=120) for h in testbed_hosts
    }
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture
def clean_containers(docker_clients: dict[str, docker.DockerClient]) -> Iterator[None]:
    """Remove every container a test left on any host, so tests stay independent."""
    yield
    for client in docker_clients.values():
        try:
            for c in client.containers.list(all=True):
                c.remove(force=True)
        except docker.errors.APIError:
            pass  # a test may have stopped this host's dockerd; the next up restarts it

"""Fixtures of the chaos suite: one two-host cluster per module, a fresh memhog per test."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.chaos.invariants import Workload
from tests.chaos.support import Cluster, chaos_cluster, heal, remove_workload, start_memhog
from tests.testbed.layout import Host


@pytest.fixture(scope="module")
def cluster(
    testbed_hosts: list[Host], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[Cluster]:
    with chaos_cluster(testbed_hosts[:2], docker_clients) as c:
        yield c


@pytest.fixture
def memhog(cluster: Cluster) -> Iterator[Workload]:
    """A memhog on the cluster's first host; whatever the test broke is healed after."""
    workload = start_memhog(cluster, cluster.hosts[0])
    try:
        yield workload
    finally:
        heal(cluster, workload)
        remove_workload(cluster, workload)

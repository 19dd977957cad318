"""Fixtures of the chaos suite: one two-host cluster per module, one memhog carried
from test to test while each leaves it well."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.chaos.invariants import Workload
from tests.chaos.support import Cluster, chaos_cluster, heal, remove_workload, take_over_memhog
from tests.testbed.layout import Host


@pytest.fixture(scope="module")
def cluster(
    testbed_hosts: list[Host], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[Cluster]:
    with chaos_cluster(testbed_hosts[:2], docker_clients) as c:
        yield c


@pytest.fixture(scope="module")
def carried(cluster: Cluster) -> Iterator[dict[str, Workload]]:
    """The module's memhog between tests (removed when the module ends)."""
    held: dict[str, Workload] = {}
    yield held
    if "hog" in held:
        remove_workload(cluster, held["hog"])


@pytest.fixture
def memhog(cluster: Cluster, carried: dict[str, Workload]) -> Iterator[Workload]:
    """A memhog on cluster.hosts[0]; whatever the test broke is healed after.

    The previous test's memhog is carried on when it passes every invariant
    (its host becomes hosts[0]): a fresh one costs a few seconds per test, and
    its state then has to survive every fault of the module in turn. Otherwise
    it is removed and a fresh one started.
    """
    workload = carried["hog"] = take_over_memhog(cluster, carried.get("hog"))
    try:
        yield workload
    finally:
        heal(cluster, workload)

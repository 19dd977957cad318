"""The target's disk is full: refused before the freeze, or rolled back cleanly when it
fills up while the state is on its way.

The target's whole Docker data root sits on a small loop filesystem
(tests/testbed/faults.mount_small_disk), which a filler file then fills.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.chaos.invariants import Workload, assert_invariants, check_all, journal_rows
from tests.chaos.support import (
    HOG_MIB,
    Cluster,
    Migration,
    assert_outcome,
    chaos_cluster,
    heal,
    remove_workload,
    start_memhog,
)
from tests.e2e.migration_support import Gate, ferry_migrate, result_of
from tests.testbed import faults
from tests.testbed.layout import Host

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

# Room for one move of the memhog: the target reserves the declared state plus 10% and
# 64 MiB of slack, the memory again (containerd's copy at restore), and a margin.
DISK_MIB = 256


@pytest.fixture(scope="module")
def cluster(
    testbed_hosts: list[Host], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[Cluster]:
    h1, h2 = testbed_hosts[:2]
    for c in docker_clients[h2.name].containers.list(all=True):
        c.remove(force=True)
    faults.mount_small_disk(h2, DISK_MIB)
    try:
        with chaos_cluster([h1, h2], docker_clients) as c:
            yield c
    finally:
        for c in docker_clients[h2.name].containers.list(all=True):
            c.remove(force=True)
        faults.unmount_small_disk(h2)


@pytest.fixture
def memhog(cluster: Cluster) -> Iterator[Workload]:
    """A fresh memhog on host1 for each test: host2 is the one with the small disk."""
    workload = start_memhog(cluster, cluster.hosts[0])
    try:
        yield workload
    finally:
        heal(cluster, workload)
        remove_workload(cluster, workload)


def test_full_target_disk_refuses_before_the_freeze(cluster: Cluster, memhog: Workload) -> None:
    h1, h2 = cluster.hosts
    faults.fill_disk(h2, leave_mib=HOG_MIB / 2)
    started = cluster.clients[h1.name].containers.get(memhog.name).attrs["State"]["StartedAt"]
    rc, lines, err = ferry_migrate(h1, memhog.name, h2.name)
    assert rc == 1, err
    result = result_of(lines)
    assert result["kind"] == "refused", result
    assert "disk" in result["reason"] and h2.name in result["reason"], result["reason"]
    # Never frozen: the same process, never stopped or restarted.
    c = cluster.clients[h1.name].containers.get(memhog.name)
    assert c.attrs["State"]["StartedAt"] == started
    rows = [r for r in journal_rows(h1) if r.role == "source" and r.started >= memhog.since]
    assert all(r.phase in ("prepare", "prestage") for r in rows), rows
    faults.unfill_disk(h2)
    here = assert_invariants(cluster.hosts, cluster.clients, memhog)
    assert here is not None and here.host == h1.name
    check_all(cluster.hosts, cluster.clients, memhog)


def test_disk_filling_during_the_transfer_rolls_back_cleanly(
    cluster: Cluster, memhog: Workload
) -> None:
    h1, h2 = cluster.hosts
    # Mid-transfer (the first 8 MiB sent), not after the freeze: with runc the state
    # streams while the dump runs, so after it most of a small hog may have arrived.
    gate = Gate(h1, "mid-transfer").arm()
    mig = Migration(h1, memhog.name, h2)
    mid = gate.wait()
    # Accepted with room to spare; then something else takes the room.
    faults.fill_disk(h2, leave_mib=HOG_MIB / 4)
    gate.release()
    rc, result, err = mig.finish()
    assert_outcome(h1, mid, rc, result, err, committed=False)
    assert result is not None and "no space left" in result["reason"], result["reason"]
    faults.unfill_disk(h2)
    check_all(cluster.hosts, cluster.clients, memhog)

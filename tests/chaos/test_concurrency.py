"""Concurrent migrations of two containers, and ping-pong between two hosts."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Workload, assert_invariants, check_all
from tests.chaos.support import Cluster, Migration, remove_workload, start_memhog
from tests.e2e.migration_support import ferry_migrate

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]


def test_two_containers_at_once(cluster: Cluster, memhog: Workload) -> None:
    h1, h2 = cluster.hosts
    other = start_memhog(cluster, h1, name="chaos-hog-b")
    try:
        first = Migration(h1, memhog.name, h2)
        second = Migration(h1, other.name, h2)
        for mig in (first, second):
            rc, result, err = mig.finish()
            assert rc == 0 and result is not None and result["ok"], (result, err)
        for w in (memhog, other):
            moved = assert_invariants(cluster.hosts, cluster.clients, w)
            assert moved is not None and moved.host == h2.name
        # One retry is enough to show the hosts are usable again; both states were checked.
        check_all(cluster.hosts, cluster.clients, memhog)
    finally:
        remove_workload(cluster, other)


def test_ping_pong(cluster: Cluster, memhog: Workload) -> None:
    # Straight back and forth: each host must be done with a copy before it sends it on.
    h1, h2 = cluster.hosts
    for src, dst in ((h1, h2), (h2, h1), (h1, h2)):
        rc, _, err = ferry_migrate(src, memhog.name, dst.name)
        assert rc == 0, f"{src.name} -> {dst.name}: {err}"
    moved = assert_invariants(cluster.hosts, cluster.clients, memhog)
    assert moved is not None and moved.host == h2.name
    check_all(cluster.hosts, cluster.clients, memhog)

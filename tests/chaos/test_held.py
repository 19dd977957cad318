"""Faults that Ferry already survived before the commit protocol (issue 8, "What held"):
keep them holding. Each ends with the invariants and a retry."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Workload, assert_invariants, check_all
from tests.chaos.support import (
    QUICK_OUTAGE_S,
    Cluster,
    Migration,
    ferry_cli,
    never_two_running,
)
from tests.e2e.migration_support import ferry_migrate, result_of
from tests.testbed import faults

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

MIB = 1024 * 1024


def test_draining_target_refuses_and_nothing_moves(cluster: Cluster, memhog: Workload) -> None:
    h1, h2 = cluster.hosts
    assert ferry_cli(h2, "drain", "--reason", "chaos").returncode == 0
    try:
        rc, lines, err = ferry_migrate(h1, memhog.name, h2.name)
    finally:
        assert ferry_cli(h2, "undrain").returncode == 0
    assert rc == 1, err
    result = result_of(lines)
    assert result["kind"] == "refused" and "draining" in result["reason"], result
    here = assert_invariants(cluster.hosts, cluster.clients, memhog)
    assert here is not None and here.host == h1.name
    check_all(cluster.hosts, cluster.clients, memhog)


def test_peer_down_refuses_with_one_line(cluster: Cluster, memhog: Workload) -> None:
    h1, h2 = cluster.hosts
    cluster.agents.stop(h2)
    try:
        rc, lines, err = ferry_migrate(h1, memhog.name, h2.name)
    finally:
        cluster.agents.start(h2)
    assert rc == 1, err
    result = result_of(lines)
    assert result["kind"] == "refused", result
    assert h2.name in result["reason"] and "\n" not in result["reason"], result["reason"]
    assert "Traceback" not in err
    check_all(cluster.hosts, cluster.clients, memhog)


def test_target_agent_killed_mid_stream_on_a_throttled_link(
    cluster: Cluster, memhog: Workload
) -> None:
    # No gate: the link is throttled so the kill lands while bytes are moving.
    h1, h2 = cluster.hosts
    faults.rate_limit(h2, 32)
    mig = Migration(h1, memhog.name, h2)
    mig.wait_progress("transfer", min_bytes=8 * MIB)
    faults.kill_agent(h2)
    never_two_running(cluster, memhog, QUICK_OUTAGE_S)
    faults.start_agent(h2)
    faults.clear_rate_limit(h2)
    rc, result, err = mig.finish()
    assert rc == 1 and result is not None and result["rolled_back"], (result, err)
    check_all(cluster.hosts, cluster.clients, memhog)

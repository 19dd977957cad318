"""SIGKILL of the source or the target agent at each phase, restarted quickly or slowly.

A quick restart comes back within a second, before any timeout fires; a slow
one stays away well past the stall and commit timeouts. The outage is watched
throughout (never two running copies), and every test ends with the
invariants and a retry.
"""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Workload, check_all, journal_rows
from tests.chaos.support import (
    QUICK_OUTAGE_S,
    SLOW_OUTAGE_S,
    Cluster,
    Migration,
    assert_outcome,
    never_two_running,
    source_row_phase,
)
from tests.e2e.migration_support import Gate
from tests.helpers import wait_for
from tests.testbed import faults

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

OUTAGES = {"quick": QUICK_OUTAGE_S, "slow": SLOW_OUTAGE_S}

# Where the source agent dies: the gate (on which side) that holds the migration there.
# "freeze" has no gate: the kill lands while Docker is still writing the checkpoint.
SOURCE_POINTS: dict[str, tuple[str, str] | None] = {
    "freeze": None,
    "transfer": ("source", "mid-transfer"),
    "restore": ("target", "before-restore"),
    "decision": ("source", "before-decision"),
    "commit": ("source", "after-decision"),
}
TARGET_POINTS: dict[str, tuple[str, str]] = {
    "freeze": ("source", "after-freeze"),
    "transfer": ("source", "mid-transfer"),
    "restore": ("target", "before-restore"),
    "commit": ("target", "before-continue"),
}


def _decision(cluster: Cluster, mid: str) -> object:
    (row,) = [r for r in journal_rows(cluster.hosts[0]) if r.id == mid and r.role == "source"]
    return row.report.get("decision")


@pytest.mark.parametrize("outage", list(OUTAGES))
@pytest.mark.parametrize("point", list(SOURCE_POINTS))
def test_source_agent_killed(cluster: Cluster, memhog: Workload, point: str, outage: str) -> None:
    h1, h2 = cluster.hosts
    where = SOURCE_POINTS[point]
    gate = Gate(h1 if where[0] == "source" else h2, where[1]).arm() if where else None
    mig = Migration(h1, memhog.name, h2)
    if gate is None:
        wait_for(
            lambda: source_row_phase(h1, memhog) == "freeze",
            timeout=60,
            interval=0.01,
            what="the source to start the checkpoint",
        )
    else:
        mid = gate.wait()
        # The source writes its decision before it acts on it, and not before the target
        # reported its copy restored (stopped).
        if point == "commit":
            assert _decision(cluster, mid) == "commit"
        elif point == "decision":
            assert _decision(cluster, mid) is None
    faults.kill_agent(h1)
    rc, _, err = mig.finish()
    assert rc == 3, f"the CLI should lose its agent (exit 3), got {rc}: {err}"
    if gate is not None:
        gate.release()  # the target goes on; the restarted source must not stop here again
    never_two_running(cluster, memhog, OUTAGES[outage])
    faults.start_agent(h1)
    check_all(cluster.hosts, cluster.clients, memhog)


@pytest.mark.parametrize("outage", list(OUTAGES))
@pytest.mark.parametrize("point", list(TARGET_POINTS))
def test_target_agent_killed(cluster: Cluster, memhog: Workload, point: str, outage: str) -> None:
    h1, h2 = cluster.hosts
    side, hook = TARGET_POINTS[point]
    gate = Gate(h1 if side == "source" else h2, hook).arm()
    mig = Migration(h1, memhog.name, h2)
    mid = gate.wait()
    faults.kill_agent(h2)
    gate.release()
    never_two_running(cluster, memhog, OUTAGES[outage])
    if outage == "slow":
        # The source ends the migration on its own while the target stays away.
        wait_for(mig.done, timeout=60, what="ferry migrate to end without the target")
        rc, result, err = mig.finish()
        assert_outcome(h1, mid, rc, result, err, committed=point == "commit", peer_away=True)
    faults.start_agent(h2)
    if outage == "quick":
        rc, result, err = mig.finish()
        assert_outcome(h1, mid, rc, result, err, committed=point == "commit")
    check_all(cluster.hosts, cluster.clients, memhog)

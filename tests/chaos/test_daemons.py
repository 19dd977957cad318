"""dockerd killed (SIGKILL) or restarted on either side while a migration is under way.

On the source the daemon goes away right after the freeze (the container's
state is then only in its checkpoint); on the target between the transfer and
the restore. A killed daemon comes back once `ferry migrate` has ended; a
restarted one before the migration goes on.
"""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Workload, check_all
from tests.chaos.support import Cluster, Migration, assert_outcome, never_two_running
from tests.e2e.migration_support import Gate
from tests.testbed import faults

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

GATES = {"source": "after-freeze", "target": "before-restore"}


@pytest.mark.parametrize("how", ["killed", "restarted"])
@pytest.mark.parametrize("side", ["source", "target"])
def test_dockerd_goes_away(cluster: Cluster, memhog: Workload, side: str, how: str) -> None:
    h1, h2 = cluster.hosts
    victim = h1 if side == "source" else h2
    gate = Gate(victim, GATES[side]).arm()
    mig = Migration(h1, memhog.name, h2)
    mid = gate.wait()
    if how == "killed":
        faults.kill_dockerd(victim)
        gate.release()
        rc, result, err = mig.finish()
        faults.start_dockerd(victim)
    else:
        faults.restart_dockerd(victim)
        gate.release()
        rc, result, err = mig.finish()
    never_two_running(cluster, memhog, 1.0)
    if rc != 0:
        # Before the decision nothing may run twice: it rolled back (or, with the
        # source's daemon gone, could not yet, and says so).
        assert result is not None and not result["ok"], (result, err)
        if side == "target":
            assert_outcome(h1, mid, rc, result, err, committed=False)
    check_all(cluster.hosts, cluster.clients, memhog)

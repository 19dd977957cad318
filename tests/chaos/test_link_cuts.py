"""The target's link cut at each phase: restored quickly, restored late, or not at all.

- short: back after QUICK_OUTAGE_S, before any timeout fires;
- long: back after SLOW_OUTAGE_S, past the stall and commit timeouts;
- none: stays cut until `ferry migrate` has ended on its own; the hosts are
  checked while still apart, then the link comes back.

The migration waits at a gate while the link is cut, so the cut lands exactly
there; the outage is watched throughout (never two running copies).
"""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Workload, assert_invariants, check_all, copies
from tests.chaos.support import (
    QUICK_OUTAGE_S,
    SLOW_OUTAGE_S,
    Cluster,
    Migration,
    assert_outcome,
    ferry_cli,
    never_two_running,
)
from tests.e2e.migration_support import Gate
from tests.helpers import wait_for
from tests.testbed import faults

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

# Where the cut lands: (side of the gate, gate, whether the source has decided commit there).
POINTS: dict[str, tuple[str, str, bool]] = {
    "freeze": ("source", "after-freeze", False),
    "transfer": ("source", "mid-transfer", False),
    "restore": ("target", "before-restore", False),  # during the restore call
    "commit": ("source", "after-decision", True),  # the commit call never arrives
    "continue": ("target", "before-continue", True),  # it arrives; the answer is lost
}
RESTORES = ("short", "long", "none")


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.parametrize("point", list(POINTS))
def test_link_cut(cluster: Cluster, memhog: Workload, point: str, restore: str) -> None:
    h1, h2 = cluster.hosts
    side, hook, committed = POINTS[point]
    gate = Gate(h1 if side == "source" else h2, hook).arm()
    mig = Migration(h1, memhog.name, h2)
    mid = gate.wait()
    faults.cut_link(h2)
    gate.release()
    if restore == "none":
        wait_for(mig.done, timeout=120, what="ferry migrate to end while the link is cut")
        rc, result, err = mig.finish()
        assert_outcome(h1, mid, rc, result, err, committed=committed, peer_away=True)
        in_doubt = rc == 1 and bool(result and result["in_doubt"])
        _check_apart(cluster, memhog, point, in_doubt)
        faults.restore_link(h2)
    else:
        never_two_running(cluster, memhog, QUICK_OUTAGE_S if restore == "short" else SLOW_OUTAGE_S)
        faults.restore_link(h2)
        rc, result, err = mig.finish()
        # A link back in time may let the migration simply go through.
        if rc != 0:
            assert_outcome(h1, mid, rc, result, err, committed=committed)
    check_all(cluster.hosts, cluster.clients, memhog)


def _check_apart(cluster: Cluster, memhog: Workload, point: str, in_doubt: bool) -> None:
    """While the hosts cannot talk: rolled back runs on the source; in doubt runs nowhere,
    unless the target got the commit before the cut (then only its answer was lost)."""
    h1, h2 = cluster.hosts
    running = [c.host for c in copies(cluster.hosts, cluster.clients, memhog) if c.running]
    if not in_doubt:
        # The target may still hold what it was sent (it cannot learn the outcome yet),
        # but nothing of it runs: the one running copy is the source's.
        assert running == [h1.name], running
    elif point == "continue":
        assert running == [h2.name], running
    else:
        assert_invariants(cluster.hosts, cluster.clients, memhog, expect="in_doubt", timeout=10)


def test_resolve_keep_source_while_apart(cluster: Cluster, memhog: Workload) -> None:
    # The operator's way out when the target is gone: keep the source's copy.
    _in_doubt_and_resolve(cluster, memhog, keep="source")


def test_resolve_keep_target_while_apart(cluster: Cluster, memhog: Workload) -> None:
    # ... and when the operator knows the target has it: the target continues once reachable.
    _in_doubt_and_resolve(cluster, memhog, keep="target")


def _in_doubt_and_resolve(cluster: Cluster, memhog: Workload, keep: str) -> None:
    h1, h2 = cluster.hosts
    gate = Gate(h1, "after-decision").arm()
    mig = Migration(h1, memhog.name, h2)
    mid = gate.wait()
    faults.cut_link(h2)
    gate.release()
    rc, result, err = mig.finish()
    assert_outcome(h1, mid, rc, result, err, committed=True, peer_away=True)
    assert rc == 1, "the commit cannot have arrived: the link was cut before it was sent"
    assert_invariants(cluster.hosts, cluster.clients, memhog, expect="in_doubt", timeout=10)
    # It waits out an abort to the unreachable target, then restores here: about 24 s on a
    # quiet machine, and once over 60 s in a CI run that was slow throughout.
    proc = ferry_cli(h1, "resolve", mid, "--keep", keep, timeout=150)
    assert proc.returncode == 0, proc.stderr
    if keep == "source":
        # Runs here again at once, from the kept checkpoint; the target's copy stays stopped.
        wait_for(
            lambda: (
                [c.host for c in copies(cluster.hosts, cluster.clients, memhog) if c.running]
                == [h1.name]
            ),
            timeout=30,
            what="the source's copy to run again",
        )
    never_two_running(cluster, memhog, QUICK_OUTAGE_S)
    faults.restore_link(h2)
    moved = assert_invariants(cluster.hosts, cluster.clients, memhog)
    assert moved is not None and moved.host == (h1.name if keep == "source" else h2.name)
    check_all(cluster.hosts, cluster.clients, memhog)

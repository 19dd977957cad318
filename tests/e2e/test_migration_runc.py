"""`migration.checkpoint_via: runc` on the testbed: dockerd's runc freezes, Docker restores.

The same checks as the engine path (test_migration_move, test_migration_faults),
with agents whose checkpoints skip containerd's content store.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.migration_support import (
    COUNTER,
    FAULT_NAME,
    FAULT_PORT,
    MEMHOG,
    MOVE_PORT,
    Agents,
    Gate,
    check_moved,
    container_or_none,
    counter_on,
    engine_agents,
    fault_state,
    ferry_migrate,
    history,
    migrate_in_background,
    readings,
    result_of,
    runs_only_on,
)
from tests.helpers import wait_for
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

PORT = MOVE_PORT
RUNC = {"checkpoint_via": "runc"}
NAMES = ("mig-counter", "mig-hog", FAULT_NAME)


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts, migration=RUNC) as agents:
        yield hosts, agents


@pytest.fixture
def cleanup(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[None]:
    yield
    for client in docker_clients.values():
        for name in NAMES:
            c = container_or_none(client, name)
            if c is not None:
                c.remove(force=True)


def _froze_via_runc(host: Host, report: dict[str, Any]) -> None:
    assert report["details"]["checkpoint_via"] == "runc", report["details"]
    # The runc checkpointer's own log line for this migration's checkpoint.
    name = f"ferry-{report['migration_id']}"
    log = Path(host.agent_log).read_text(errors="replace").splitlines()
    assert any("migration.runc_checkpointed" in x and name in x for x in log), name


def test_counter_moves_with_its_state(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: None,
) -> None:
    (h1, h2), _ = cluster
    docker_clients[h1.name].containers.run(
        COUNTER,
        name="mig-counter",
        detach=True,
        ports={"8080/tcp": PORT},
        restart_policy={"Name": "unless-stopped"},
        environment={"COUNTER_INTERVAL_MS": "100"},
    )
    before = counter_on(h1, via=h1)
    rc, lines, err = ferry_migrate(h1, "mig-counter", h2.name)
    assert rc == 0, err
    report = result_of(lines)["report"]
    assert report["outcome"] == "succeeded"
    _froze_via_runc(h1, report)
    print(f"\nrunc 1->2: downtime {report['downtime_s']}s, freeze {report['phases']['freeze']}s")
    middle = check_moved(before, h1, h2, docker_clients)

    # And back: runc on the other host, into a container Docker created there.
    rc, lines, err = ferry_migrate(h2, "mig-counter", h1.name)
    assert rc == 0, err
    back = result_of(lines)["report"]
    _froze_via_runc(h2, back)
    print(f"runc 2->1: downtime {back['downtime_s']}s, freeze {back['phases']['freeze']}s")
    check_moved(middle, h2, h1, docker_clients)


def test_memhog_keeps_its_memory(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: None,
) -> None:
    (h1, h2), _ = cluster
    hog = docker_clients[h1.name].containers.run(
        MEMHOG, name="mig-hog", detach=True, environment={"MEMHOG_MIB": "256"}
    )
    before = wait_for(lambda: len(r := readings(hog)) >= 2 and r, timeout=60, what="readings")
    rc, lines, err = ferry_migrate(h1, "mig-hog", h2.name, timeout=600)
    assert rc == 0, err
    report = result_of(lines)["report"]
    _froze_via_runc(h1, report)
    print(
        f"\nrunc 256 MiB: downtime {report['downtime_s']}s, freeze {report['phases']['freeze']}s,"
        f" state {report['bytes_state_raw']} bytes raw"
    )
    assert report["bytes_state_raw"] >= 256 * 1024 * 1024
    moved = docker_clients[h2.name].containers.get("mig-hog")
    after = wait_for(lambda: readings(moved), timeout=60, what="readings on host2")
    # Goes on from where it was (no restart at iter 0), with the same memory.
    assert after[0][0] >= before[-1][0], (before, after)
    assert all(c == before[0][1] for _, c in before + after)


def test_failure_after_a_runc_freeze_rolls_back_with_state(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: None,
) -> None:
    (h1, h2), agents = cluster
    docker_clients[h1.name].containers.run(
        COUNTER,
        name=FAULT_NAME,
        detach=True,
        ports={"8080/tcp": FAULT_PORT},
        restart_policy={"Name": "always"},
    )
    before = fault_state(h1, 3)
    try:
        with Gate(h1, "after-freeze") as gate:
            cli = migrate_in_background(h1, FAULT_NAME, h2.name)
            mid = gate.wait()
            frozen = docker_clients[h1.name].containers.get(FAULT_NAME)
            # Frozen in place, its images complete beside it.
            assert frozen.status == "paused", frozen.status
            images = Path(h1.data_root) / "containers" / frozen.id / "checkpoints" / f"ferry-{mid}"
            assert (images / "inventory.img").exists()
            agents.stop(h2, signal.SIGTERM)  # the target goes away: the transfer must fail
        out, err = cli.communicate(timeout=300)
    finally:
        if not h2.agent_pid:
            agents.start(h2)
    assert cli.returncode == 1, err
    result = result_of([json.loads(x) for x in out.splitlines() if x.startswith("{")])
    assert result["kind"] == "failed" and result["rolled_back"], result
    report = result["report"]
    assert report["details"]["checkpoint_via"] == "runc"
    # Unpaused where it was: the same process, nothing restored, images dropped.
    assert report["details"]["rollback"].startswith("resumed in place"), report["details"]
    assert not images.exists()
    runs_only_on(h1, before, docker_clients)
    (rec,) = history(h1, report["migration_id"])
    assert rec.outcome == "rolled_back"
    print(f"\nrunc rollback: {rec.reason}; {rec.report['details'].get('rollback')}")

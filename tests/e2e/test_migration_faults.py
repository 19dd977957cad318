"""Failures on the testbed: the container ends up running exactly once, with its state."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from tests.e2e.migration_support import (
    COUNTER,
    FAULT_NAME,
    FAULT_PORT,
    Agents,
    Gate,
    container_or_none,
    engine_agents,
    fault_state,
    ferry_migrate,
    history,
    migrate_in_background,
    result_of,
    runs_only_on,
)
from tests.helpers import wait_for
from tests.testbed import host_run, start_dockerd, stop_dockerd
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

PORT = FAULT_PORT
NAME = FAULT_NAME


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    hosts = testbed_hosts[:2]
    # The bind test's path is one the targets accept: refused only because it is missing.
    accept = {"accept": {"bind_prefixes": ["/tmp/ferry-e2e-bind"]}}
    with engine_agents(hosts, migration=accept) as agents:
        yield hosts, agents


@pytest.fixture
def counter(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[dict[str, Any]]:
    (h1, _), _ = cluster
    docker_clients[h1.name].containers.run(
        COUNTER,
        name=NAME,
        detach=True,
        ports={"8080/tcp": PORT},
        restart_policy={"Name": "always"},
    )
    yield fault_state(h1, 3)
    for client in docker_clients.values():
        c = container_or_none(client, NAME)
        if c is not None:
            c.remove(force=True)


def test_restore_failure_on_target_rolls_back(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    counter: dict[str, Any],
) -> None:
    (h1, h2), _ = cluster
    try:
        with Gate(h2, "before-restore") as gate:
            proc = migrate_in_background(h1, NAME, h2.name)
            gate.wait()
            stop_dockerd(h2)  # the target's daemon goes away between transfer and restore
        out, err = proc.communicate(timeout=300)
    finally:
        start_dockerd(h2)
    assert proc.returncode == 1, err
    result = result_of([json.loads(x) for x in out.splitlines() if x.startswith("{")])
    assert result["kind"] == "failed" and result["rolled_back"], result
    assert "restore" in result["reason"], result["reason"]
    runs_only_on(h1, counter, docker_clients)
    # The target removes its half-made container once its daemon is back.
    wait_for(
        lambda: container_or_none(docker_clients[h2.name], NAME) is None,
        timeout=90,
        what="the target's leftover to be removed",
    )
    (rec,) = history(h1, result["report"]["migration_id"])
    assert rec.outcome == "rolled_back" and "restore" in (rec.reason or "")
    print(f"\nrolled back: {rec.reason}; {rec.report['details'].get('rollback')}")


def test_source_agent_killed_after_freeze_reconciles(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    counter: dict[str, Any],
) -> None:
    (h1, h2), agents = cluster
    with Gate(h1, "after-freeze") as gate:
        cli = migrate_in_background(h1, NAME, h2.name)
        mid = gate.wait()
        # The default (runc) checkpointer freezes it in place.
        assert docker_clients[h1.name].containers.get(NAME).status == "paused"
        agents.stop(h1, signal.SIGKILL)
        cli.communicate(timeout=60)
        assert cli.returncode == 3  # the agent went away under it
    (rec,) = history(h1, mid)
    assert rec.outcome is None and rec.phase == "freeze"

    agents.start(h1)  # reconcile runs before it answers
    runs_only_on(h1, counter, docker_clients)
    assert container_or_none(docker_clients[h2.name], NAME) is None
    (rec,) = history(h1, mid)
    assert rec.outcome == "rolled_back", rec
    assert "restarted" in (rec.reason or ""), rec.reason
    (trec,) = history(h2, mid)
    assert trec.outcome == "aborted"


def test_missing_bind_mount_is_refused_before_the_freeze(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
) -> None:
    (h1, h2), _ = cluster
    assert host_run(h1, ["mkdir", "-p", "/tmp/ferry-e2e-bind"]).returncode == 0
    c1 = docker_clients[h1.name]
    c1.containers.run(
        COUNTER,
        name=NAME,
        detach=True,
        ports={"8080/tcp": PORT},
        volumes={"/tmp/ferry-e2e-bind": {"bind": "/bound", "mode": "rw"}},
    )
    try:
        before = fault_state(h1, 3)
        rc, lines, err = ferry_migrate(h1, NAME, h2.name)
        assert rc == 1, err
        result = result_of(lines)
        assert result["kind"] == "refused", result
        assert "bind mount source missing on host2" in result["reason"], result["reason"]
        assert "/tmp/ferry-e2e-bind" in result["reason"]
        assert "refused" in err
        after = fault_state(h1, before["counter"] + 1)
        assert after["nonce"] == before["nonce"]
        assert c1.containers.get(NAME).attrs["State"]["Running"]
        assert container_or_none(docker_clients[h2.name], NAME) is None
        # Refused by the up-front check (nothing journalled) or at prestage: never frozen.
        if result.get("report"):
            (rec,) = history(h1, result["report"]["migration_id"])
            assert rec.outcome == "refused" and rec.phase in ("prepare", "prestage")
    finally:
        for client in docker_clients.values():
            c = container_or_none(client, NAME)
            if c is not None:
                c.remove(force=True)

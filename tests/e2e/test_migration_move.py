"""`ferry migrate` on the testbed: state, open files, ports and images move with the container."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.e2e.migration_support import (
    COUNTER,
    MEMHOG,
    MOVE_PORT,
    ONLY_ON_FIRST,
    check_moved,
    container_or_none,
    counter_on,
    engine_agents,
    ferry_migrate,
    history,
    readings,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

PORT = MOVE_PORT
NAMES = ("mig-counter", "mig-oof", "mig-hog")


@pytest.fixture(scope="module")
def agents(testbed_hosts: list[Host]) -> Iterator[list[Host]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts):
        yield hosts


@pytest.fixture
def cleanup(agents: list[Host], docker_clients: dict[str, docker.DockerClient]) -> Iterator[None]:
    yield
    for client in docker_clients.values():
        for name in NAMES:
            c = container_or_none(client, name)
            if c is not None:
                c.remove(force=True)


def test_counter_moves_there_and_back(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], cleanup: None
) -> None:
    h1, h2 = agents
    docker_clients[h1.name].containers.run(
        COUNTER,
        name="mig-counter",
        detach=True,
        ports={"8080/tcp": PORT},
        restart_policy={"Name": "unless-stopped"},
        labels={"app": "counter"},
        environment={"COUNTER_INTERVAL_MS": "100"},
    )
    before = counter_on(h1, via=h1)

    rc, lines, err = ferry_migrate(h1, "mig-counter", h2.name)
    assert rc == 0, err
    report = result_of(lines)["report"]
    assert report["outcome"] == "succeeded"
    assert report["downtime_s"] is not None and report["downtime_s"] < 10
    assert report["bytes_state"] > 0 and report["bytes_image"] == 0
    assert set(report["phases"]) >= {"prepare", "prestage", "freeze", "transfer", "restore"}
    assert {x["phase"] for x in lines if x.get("type") == "progress"} >= {"freeze", "transfer"}
    print(f"\n1->2: downtime {report['downtime_s']}s, {report['bytes_moved']} bytes")
    moved = docker_clients[h2.name].containers.get("mig-counter")
    assert moved.labels["app"] == "counter"
    assert "COUNTER_INTERVAL_MS=100" in moved.attrs["Config"]["Env"]
    middle = check_moved(before, h1, h2, docker_clients)

    rc, lines, err = ferry_migrate(h2, "mig-counter", h1.name)
    assert rc == 0, err
    back = result_of(lines)["report"]
    print(f"2->1: downtime {back['downtime_s']}s, {back['bytes_moved']} bytes")
    check_moved(middle, h2, h1, docker_clients)

    # Both ends recorded it, whoever started it.
    (src_rec,) = history(h1, report["migration_id"])
    (dst_rec,) = history(h2, report["migration_id"])
    assert (src_rec.role, src_rec.outcome) == ("source", "succeeded")
    assert (dst_rec.role, dst_rec.outcome) == ("target", "succeeded")
    assert src_rec.report["downtime_s"] == report["downtime_s"]


def test_image_is_shipped_with_its_id(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], cleanup: None
) -> None:
    h1, h2 = agents
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    with pytest.raises(docker.errors.ImageNotFound):
        c2.images.get(ONLY_ON_FIRST)
    image_id = c1.images.get(ONLY_ON_FIRST).id
    c1.containers.run(ONLY_ON_FIRST, name="mig-oof", detach=True)
    try:
        rc, lines, err = ferry_migrate(h1, "mig-oof", h2.name)
        assert rc == 0, err
        report = result_of(lines)["report"]
        assert report["image_shipped"] and report["bytes_image"] > 0
        assert c2.images.get(ONLY_ON_FIRST).id == image_id
        moved = c2.containers.get("mig-oof")
        assert moved.status == "running" and moved.image.id == image_id
    finally:
        c = container_or_none(c2, "mig-oof")
        if c is not None:
            c.remove(force=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            c2.images.remove(image_id, force=True)  # keep "only on first" true for other tests


def test_memhog_keeps_its_memory(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], cleanup: None
) -> None:
    h1, h2 = agents
    hog = docker_clients[h1.name].containers.run(
        MEMHOG, name="mig-hog", detach=True, environment={"MEMHOG_MIB": "256"}
    )
    before = wait_for(lambda: len(r := readings(hog)) >= 2 and r, timeout=60, what="readings")
    rc, lines, err = ferry_migrate(h1, "mig-hog", h2.name, timeout=600)
    assert rc == 0, err
    report = result_of(lines)["report"]
    print(f"\n256 MiB: downtime {report['downtime_s']}s, state {report['bytes_state']} bytes")
    assert report["bytes_state_raw"] >= 256 * 1024 * 1024
    moved = docker_clients[h2.name].containers.get("mig-hog")
    after = wait_for(lambda: readings(moved), timeout=60, what="readings on host2")
    # The restored process goes on from where it was (no restart at iter 0) with the same memory.
    assert after[0][0] >= before[-1][0], (before, after)
    assert all(c == before[0][1] for _, c in before + after)


def test_named_volume_is_copied(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], cleanup: None
) -> None:
    h1, h2 = agents
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    vol = "mig-vol-data"
    for c in (c1, c2):
        with contextlib.suppress(docker.errors.NotFound):
            c.volumes.get(vol).remove(force=True)
    c1.containers.run(COUNTER, name="mig-counter", detach=True, volumes={vol: {"bind": "/vol"}})
    # The volume's content, written where the daemon keeps it (as the agent sees it).
    data = Path(h1.data_root) / "volumes" / vol / "_data"
    (data / "kept.txt").write_text("volume content\n")
    try:
        rc, _, err = ferry_migrate(h1, "mig-counter", h2.name)
        assert rc == 0, err
        moved = Path(h2.data_root) / "volumes" / vol / "_data" / "kept.txt"
        assert moved.read_text() == "volume content\n"
        assert c2.containers.get("mig-counter").status == "running"
    finally:
        for c in (c1, c2):
            with contextlib.suppress(docker.errors.NotFound):
                c.containers.get("mig-counter").remove(force=True)
            with contextlib.suppress(docker.errors.NotFound):
                c.volumes.get(vol).remove(force=True)

"""Refused before the freeze, the container never stops: not enough disk, or the peer down.

Each host's Docker data root sits on a small loop filesystem of its own
(tests.testbed.faults.mount_small_disk), filled until a set amount is free.
The amounts are chosen where the old estimate (memory + writable layer) said
"fits" but the real need did not: a 64 MiB memhog's dump on a source with
100 MiB free used to die half-written, and a target with 100 MiB free used
to fail the restore (containerd copies the images into its content store)
after the whole checkpoint had been sent.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.migration_support import (
    MEMHOG,
    Agents,
    container_or_none,
    engine_agents,
    ferry_migrate,
    history,
    readings,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed import faults
from tests.testbed.layout import AGENT_PORT, Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

NAME = "disk-hog"
HOG_MIB = 64
DISK_MIB = 1024  # room for whatever earlier modules left in the data root
REPO = Path(__file__).resolve().parents[2]
LEAVE_MIB = 100  # above the old estimate (71 MiB), below the real need (about 160 MiB)


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    pair = testbed_hosts[:2]
    mounted: list[Host] = []
    try:
        for h in pair:
            faults.mount_small_disk(h, DISK_MIB)
            mounted.append(h)
        with engine_agents(pair) as agents:
            yield pair, agents
    finally:
        failures = []
        for h in mounted:  # each host is put back even if another one fails
            try:
                faults.unfill_disk(h)
                faults.unmount_small_disk(h)
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture
def hosts(cluster: tuple[list[Host], Agents]) -> list[Host]:
    return cluster[0]


@pytest.fixture
def hog(hosts: list[Host], docker_clients: dict[str, docker.DockerClient]) -> Iterator[Any]:
    h1 = hosts[0]
    c = docker_clients[h1.name].containers.run(
        MEMHOG,
        name=NAME,
        detach=True,
        environment={"MEMHOG_MIB": str(HOG_MIB)},
        restart_policy={"Name": "always"},
        labels={"ferry.migrate": "true"},
    )
    wait_for(lambda: readings(c), 60, what="the memhog's first reading")
    yield c
    for h in hosts:
        faults.unfill_disk(h)
        gone = container_or_none(docker_clients[h.name], NAME)
        if gone is not None:
            gone.remove(force=True)


def _refused_untouched(
    hosts: list[Host], hog: Any, clients: dict[str, docker.DockerClient], expected: str
) -> str:
    h1, h2 = hosts
    before = clients[h1.name].api.inspect_container(NAME)
    first = readings(hog)
    rc, lines, err = ferry_migrate(h1, NAME, h2.name)
    assert rc == 1, err
    result = result_of(lines)
    assert result["kind"] == "refused", result
    reason = result["reason"]
    assert expected in reason, reason
    assert "\n" not in reason and "Traceback" not in err
    assert err.strip() == f"ferry: migration refused, {NAME} untouched: {reason}"
    # Never frozen: the same process, never restarted, still counting with its memory.
    after = clients[h1.name].api.inspect_container(NAME)
    assert after["State"]["Running"] and not after["State"]["Paused"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    assert after["RestartCount"] == before["RestartCount"]
    later = wait_for(
        lambda: (r := readings(hog)) and r[-1][0] > first[-1][0] and r, 30, what="more readings"
    )
    # The same process goes on counting (no restart at iteration 0) over the same memory.
    assert [i for i, _ in later[: len(first)]] == [i for i, _ in first]
    assert all(c == first[0][1] for _, c in later)
    assert container_or_none(clients[h2.name], NAME) is None
    # Refused by the up-front check nothing is journalled; refused at prepare, it is.
    if result.get("report"):
        (rec,) = history(h1, result["report"]["migration_id"])
        assert rec.outcome == "refused" and rec.phase == "prepare", rec
    return str(reason)


_AMOUNTS = re.compile(r"needs \d+ MiB \((\d+) bytes\), \d+ MiB \((\d+) bytes\) free$")


def _check_amounts(reason: str) -> None:
    """The bytes in the message are the real ones: free as filled, more needed than that."""
    m = _AMOUNTS.search(reason)
    assert m, reason
    need, free = int(m[1]), int(m[2])
    assert abs(free - (LEAVE_MIB << 20)) < (1 << 20), reason  # the filesystem's own rounding
    assert need > free, reason


def test_target_short_of_disk_refuses_before_the_freeze(
    hosts: list[Host], hog: Any, docker_clients: dict[str, docker.DockerClient]
) -> None:
    h2 = hosts[1]
    faults.fill_disk(h2, LEAVE_MIB)
    reason = _refused_untouched(
        hosts,
        hog,
        docker_clients,
        # Said by the up-front check (`host2: ...`) or by prepare (`host2 refused: ...`).
        f"{h2.name}: not enough free disk under {h2.data_root}: needs ",
    )
    _check_amounts(reason)


def test_source_short_of_disk_refuses_before_the_freeze(
    hosts: list[Host], hog: Any, docker_clients: dict[str, docker.DockerClient]
) -> None:
    h1 = hosts[0]
    faults.fill_disk(h1, LEAVE_MIB)
    reason = _refused_untouched(
        hosts,
        hog,
        docker_clients,
        f"{h1.name}: not enough free disk under {h1.data_root} for the checkpoint: needs ",
    )
    _check_amounts(reason)


def test_peer_down_is_refused_in_one_line_naming_peer_and_address(
    cluster: tuple[list[Host], Agents], hog: Any, docker_clients: dict[str, docker.DockerClient]
) -> None:
    (h1, h2), agents = cluster
    agents.stop(h2)
    try:
        address = f"{h2.ip}:{AGENT_PORT}"
        _refused_untouched(
            [h1, h2],
            hog,
            docker_clients,
            # The up-front check asks first (/v1/check); prepare would say /v1/migrations.
            f"peer {h2.name} at {address}: connection refused (POST /v1/",
        )
        # ferry status lists the peer with the same line once its health poll fails.
        line = f"peer {h2.name} at {address}: connection refused (GET /v1/health)"

        def peer_error() -> str | None:
            proc = faults.netns_run(
                h1, [sys.executable, "-m", "agent", "status", "--json", "--config",
                     str(h1.agent_config)],
            )  # fmt: skip
            peers = json.loads(proc.stdout)["peers"]
            return next(p.get("error") for p in peers if p["name"] == h2.name)

        assert wait_for(lambda: peer_error() == line, 30, what="status to list host2 as down")
    finally:
        agents.start(h2)

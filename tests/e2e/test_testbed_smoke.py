"""The manual migration procedure, by hand through the Docker Engine API, with no Ferry code.

This is the ground truth every Ferry claim stands on: checkpoint on host 1,
copy the image and the writable layer, create on host 2, start from the
checkpoint, and the process carries on with its memory and open files.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import wait_for
from tests.testbed import http_get_json
from tests.testbed.manual import move_by_hand

pytestmark = [pytest.mark.testbed]

COUNTER = "ferry-test/counter:1"
MEMHOG = "ferry-test/memhog:1"


def test_counter_migrates_by_hand(testbed_hosts, docker_clients, clean_containers):
    h1, h2 = testbed_hosts[0], testbed_hosts[1]
    c1 = docker_clients[h1.name]
    c1.containers.run(COUNTER, name="smoke-counter", detach=True, ports={"8080/tcp": 8080})
    url1 = f"http://{h1.ip}:8080/"
    before = wait_for(
        lambda: (s := http_get_json(h1, url1)) and s["counter"] >= 10 and s,
        timeout=30,
        what="counter to reach 10 on host1",
    )

    move_by_hand(
        h1,
        h2,
        docker_clients,
        "smoke-counter",
        {"ports": [8080], "host_config": c1.api.create_host_config(port_bindings={8080: 8080})},
        over_network=True,  # tar, copy over the hosts' network, untar: as an operator would
    )

    # A client on host 1's network reaches the service at host 2's address and port.
    url2 = f"http://{h2.ip}:8080/"
    after = wait_for(lambda: http_get_json(h1, url2), timeout=30, what="counter to answer on host2")
    assert after["nonce"] == before["nonce"], "a fresh process answered, not the restored one"
    assert after["counter"] >= before["counter"], "the in-memory counter went back"
    assert after["lines"] >= before["lines"], "lines written to the open file were lost"
    # The restored process keeps counting and appending to the file it had open.
    later = wait_for(
        lambda: (s := http_get_json(h1, url2)) and s["counter"] > after["counter"] + 2 and s,
        timeout=30,
        what="counter to keep going on host2",
    )
    assert later["lines"] >= later["counter"] - 1 > after["lines"]
    assert c1.containers.get("smoke-counter").status == "exited"


def _readings(container) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """(iteration, checksum) pairs the memhog printed so far."""
    found = re.findall(r"iter=(\d+) mib=\d+ checksum=([0-9a-f]{16})", container.logs().decode())
    return [(int(i), c) for i, c in found]


def test_memhog_checksum_survives_manual_move(testbed_hosts, docker_clients, clean_containers):
    h1, h2 = testbed_hosts[0], testbed_hosts[1]
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    src = c1.containers.run(
        MEMHOG, name="smoke-memhog", detach=True, environment={"MEMHOG_MIB": "64"}
    )
    first = wait_for(lambda: len(_readings(src)) >= 2 and _readings(src), timeout=60, what="memhog")
    original = first[0][1]

    move_by_hand(h1, h2, docker_clients, "smoke-memhog", {"environment": {"MEMHOG_MIB": "64"}})
    last_iter_on_source = _readings(src)[-1][0]

    moved = c2.containers.get("smoke-memhog")
    seen = wait_for(lambda: _readings(moved), timeout=60, what="a checksum from host2")
    moved.reload()
    assert moved.status == "running"
    # The fill is deterministic, so the iteration count is what tells a restored
    # process from a fresh start (which would begin again at iter=0).
    assert seen[0][0] > last_iter_on_source, (
        f"memhog restarted: {seen[0]} after {last_iter_on_source}"
    )
    assert {c for _, c in seen} == {original}, f"memory changed in the move: {original} -> {seen}"

"""The manual migration procedure, by hand through the Docker Engine API, with no Ferry code.

This is the ground truth every Ferry claim stands on: checkpoint on host 1,
copy the image and the writable layer, create on host 2, start from the
checkpoint, and the process carries on with its memory and open files.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import docker
import pytest

from tests.helpers import wait_for
from tests.testbed import Host, http_get_json

pytestmark = [pytest.mark.testbed]

COUNTER = "ferry-test/counter:1"
MEMHOG = "ferry-test/memhog:1"


def host_path(host: Host, daemon_path: str) -> Path:
    """A path inside a host's dockerd mount namespace, seen from the root namespace."""
    rel = Path(daemon_path).relative_to("/var/lib/docker")
    return Path(host.data_root) / rel


def checkpoint(api: docker.APIClient, cid: str, name: str) -> None:
    # The SDK has no checkpoint calls; this is the Engine API's own endpoint.
    res = api.post(
        api._url("/containers/{0}/checkpoints", cid), json={"CheckpointID": name, "Exit": True}
    )
    api._raise_for_status(res)


def start_from_checkpoint(api: docker.APIClient, cid: str, name: str) -> None:
    res = api.post(api._url("/containers/{0}/start", cid), params={"checkpoint": name})
    api._raise_for_status(res)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy keeping owners, modes, xattrs and overlay whiteouts (char devices 0:0)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def move_by_hand(
    src: Host, dst: Host, clients: dict[str, docker.DockerClient], name: str, create_kwargs: dict
) -> str:
    """Checkpoint `name` on src, recreate it on dst from the same image and start it there."""
    src_api, dst_api = clients[src.name].api, clients[dst.name].api
    info = src_api.inspect_container(name)
    image_id = info["Image"]
    # Step 2a: the image. Testbed images were loaded with `docker save | docker load`,
    # which keeps the ID; ship it the same way if the target lacks it.
    try:
        dst_api.inspect_image(image_id)
    except docker.errors.ImageNotFound:
        dst_api.load_image(src_api.get_image(image_id))
    assert dst_api.inspect_image(image_id)["Id"] == image_id

    checkpoint(src_api, info["Id"], "smoke")  # step 1
    assert src_api.inspect_container(name)["State"]["Running"] is False

    created = dst_api.create_container(image_id, name=name, **create_kwargs)  # step 3
    new_id = created["Id"]
    new_info = dst_api.inspect_container(new_id)
    copy_tree(  # step 2b: checkpoint images and the writable layer
        Path(src.data_root) / "containers" / info["Id"] / "checkpoints" / "smoke",
        Path(dst.data_root) / "containers" / new_id / "checkpoints" / "smoke",
    )
    copy_tree(
        host_path(src, info["GraphDriver"]["Data"]["UpperDir"]),
        host_path(dst, new_info["GraphDriver"]["Data"]["UpperDir"]),
    )
    start_from_checkpoint(dst_api, new_id, "smoke")  # step 4
    return new_id


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

"""The manual migration procedure operators use today, through the Docker Engine API only.

No Ferry code: this is the ground truth the smoke tests check and the
baseline `make bench` measures Ferry against.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker

from tests.testbed.layout import Host


@dataclass
class ManualTimings:
    """Seconds spent in each step of one manual move."""

    steps: dict[str, float] = field(default_factory=dict)
    downtime: float = 0.0  # checkpoint start -> running on the target

    def mark(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.steps[name] = now - started
        return now


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
    src: Host,
    dst: Host,
    clients: dict[str, docker.DockerClient],
    name: str,
    create_kwargs: dict,
    timings: ManualTimings | None = None,
) -> str:
    """Checkpoint `name` on src, recreate it on dst from the same image and start it there."""
    t = timings or ManualTimings()
    t0 = time.monotonic()
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

    t1 = t.mark("image", t0)
    checkpoint(src_api, info["Id"], "smoke")  # step 1
    t2 = t.mark("checkpoint", t1)
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
    t3 = t.mark("copy+create", t2)
    start_from_checkpoint(dst_api, new_id, "smoke")  # step 4
    t.mark("restore", t3)
    t.downtime = time.monotonic() - t1
    return new_id

"""The manual migration procedure operators use today, through the Docker Engine API only.

No Ferry code: this is the ground truth the smoke tests check and the
baseline `make bench` measures Ferry against.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker

from tests.testbed.layout import Host
from tests.testbed.procs import netns_argv


@dataclass
class ManualTimings:
    """Seconds spent in each step of one manual move."""

    steps: dict[str, float] = field(default_factory=dict)
    downtime: float = 0.0  # checkpoint start -> running on the target
    archive_bytes: int = 0

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
    over_network: bool = False,
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
    # Step 2b: the checkpoint images and the writable layer.
    src_dirs = {
        "checkpoint": Path(src.data_root) / "containers" / info["Id"] / "checkpoints" / "smoke",
        "upper": host_path(src, info["GraphDriver"]["Data"]["UpperDir"]),
    }
    dst_dirs = {
        "checkpoint": Path(dst.data_root) / "containers" / new_id / "checkpoints" / "smoke",
        "upper": host_path(dst, new_info["GraphDriver"]["Data"]["UpperDir"]),
    }
    if over_network:
        t.archive_bytes = scp_like_copy(src, dst, src_dirs, dst_dirs)
    else:
        for key in src_dirs:
            copy_tree(src_dirs[key], dst_dirs[key])
    t3 = t.mark("copy+create", t2)
    start_from_checkpoint(dst_api, new_id, "smoke")  # step 4
    t.mark("restore", t3)
    t.downtime = time.monotonic() - t1
    return new_id


_RECEIVE = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
conn, _ = srv.accept()
with open(sys.argv[3], "wb") as out:
    while chunk := conn.recv(1 << 20):
        out.write(chunk)
"""
_SEND = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
with s, open(sys.argv[3], "rb") as f:
    while chunk := f.read(1 << 20):
        s.sendall(chunk)
"""


def _send_file(src: Host, dst: Host, path: Path, landed: Path) -> None:
    """Copy one file from src's network to a listener on dst's address, like scp would."""
    port = "9999"
    recv = subprocess.Popen(
        netns_argv(dst, [sys.executable, "-c", _RECEIVE, dst.ip, port, str(landed)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "listening"
        subprocess.run(
            netns_argv(src, [sys.executable, "-c", _SEND, dst.ip, port, str(path)]), check=True
        )
        recv.wait(timeout=120)
    finally:
        recv.kill()


def scp_like_copy(
    src: Host, dst: Host, src_dirs: dict[str, Path], dst_dirs: dict[str, Path]
) -> int:
    """The operator's way: tar+gzip to a file, copy it over the network, untar.

    Returns the archive size. Traffic goes only between the two testbed hosts.
    """
    size = 0
    for key, src_dir in src_dirs.items():
        archive = Path(src.host_dir) / "tmp" / f"manual-{key}.tar.gz"
        landed = Path(dst.host_dir) / "tmp" / f"manual-{key}.tar.gz"
        xattrs = ["--xattrs", "--xattrs-include=*"]
        subprocess.run(["tar", *xattrs, "-czf", str(archive), "-C", str(src_dir), "."], check=True)
        _send_file(src, dst, archive, landed)
        dst_dirs[key].mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", *xattrs, "-xzf", str(landed), "-C", str(dst_dirs[key])], check=True)
        size += archive.stat().st_size
        archive.unlink()
        landed.unlink()
    return size

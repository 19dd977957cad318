"""Fault controls for tests: every way a test may break a host, in one place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.testbed import agents as _agents
from tests.testbed import hosts as _hosts
from tests.testbed import procs
from tests.testbed.layout import SWITCH_NETNS, Host, load_state, save_state


def _persist(host: Host) -> None:
    # Keep state.json's dockerd pid current so `down` and other processes see it.
    all_hosts, rootfs = load_state()
    if rootfs is None:
        return
    save_state([host if h.name == host.name else h for h in all_hosts], rootfs)


def cut_link(host: Host) -> None:
    """Unplug the host from the shared bridge: peers can no longer reach it."""
    procs.run(["ip", "-n", SWITCH_NETNS, "link", "set", host.veth, "down"])


def restore_link(host: Host) -> None:
    procs.run(["ip", "-n", SWITCH_NETNS, "link", "set", host.veth, "up"])


def stop_dockerd(host: Host) -> None:
    """Graceful stop (SIGTERM); its containers are stopped by dockerd."""
    _hosts.stop_dockerd(host, signal.SIGTERM)
    _persist(host)


def kill_dockerd(host: Host) -> None:
    """SIGKILL dockerd, as a crash would."""
    _hosts.stop_dockerd(host, signal.SIGKILL)
    _persist(host)


def start_dockerd(host: Host) -> None:
    _hosts.start_dockerd(host)
    _persist(host)


def restart_dockerd(host: Host) -> None:
    stop_dockerd(host)
    start_dockerd(host)


def netns_run(
    host: Host, cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in the host's network namespace (root mount namespace)."""
    return subprocess.run(
        procs.netns_argv(host, cmd, env), capture_output=True, text=True, timeout=timeout
    )


def host_run(host: Host, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside the host itself (its rootfs, e.g. `criu check`)."""
    return subprocess.run(
        procs.nsenter_host(host, cmd), capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- link speed


def rate_limit(host: Host, mbit: int) -> None:
    """Throttle the host's link both ways to `mbit` Mbit/s (tbf), so a few tens of MiB
    take seconds to cross and a fault can land while a transfer is under way."""
    for netns, dev in ((SWITCH_NETNS, host.veth), (host.netns, "eth0")):
        procs.run(
            ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root",
             "tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "200ms"]
        )  # fmt: skip


def clear_rate_limit(host: Host) -> None:
    for netns, dev in ((SWITCH_NETNS, host.veth), (host.netns, "eth0")):
        # Deleting the default qdisc fails harmlessly: nothing was limited.
        procs.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)


# ---------------------------------------------------------------- agents


def kill_agent(host: Host) -> None:
    """SIGKILL the host's ferry agent, as a crash or an OOM kill would."""
    _agents.stop_agent(host, signal.SIGKILL)


def start_agent(host: Host) -> None:
    """Start the host's agent again (its reconcile runs before it answers)."""
    _agents.start_agent(host)


# ---------------------------------------------------------------- disk


def _loop_state(host: Host) -> Path:
    return Path(host.host_dir) / "small-disk.json"


def _mount_in_host(host: Host, args: list[str]) -> None:
    procs.run(procs.nsenter_host(host, args))


def mount_small_disk(host: Host, mib: int) -> None:
    """Put the host's whole Docker data root on a `mib` MiB ext4 loop filesystem.

    The data root is a plain directory of the machine's big disk, so "disk
    full" needs a filesystem of its own. A loop device can be mounted twice,
    and both mounts share one filesystem: one in the root mount namespace (where
    the agent reads the data root and measures free space) and one in the host's
    own namespace (where its dockerd writes). The current contents (the test
    images) are copied in, so image IDs stay the same. dockerd is restarted;
    the host must have no containers.
    """
    state = _loop_state(host)
    if state.exists():
        raise RuntimeError(f"{host.name} already has a small disk; unmount it first")
    _hosts.stop_dockerd(host, signal.SIGTERM)
    image = Path(host.host_dir) / "small-disk.img"
    staging = Path(host.host_dir) / "small-disk.mnt"
    procs.run(["truncate", "-s", f"{mib}M", str(image)])
    procs.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
    dev = procs.run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    state.write_text(json.dumps({"device": dev, "image": str(image)}))
    staging.mkdir(exist_ok=True)
    procs.run(["mount", dev, str(staging)])
    try:
        procs.run(["cp", "-a", f"{host.data_root}/.", str(staging)])
    finally:
        procs.run(["umount", str(staging)])
        staging.rmdir()
    procs.run(["mount", dev, host.data_root])
    _mount_in_host(host, ["mount", dev, "/var/lib/docker"])
    start_dockerd(host)


def unmount_small_disk(host: Host) -> None:
    """Undo `mount_small_disk`: the data root as it was before (containers on the
    small disk are gone with it; remove them first so containerd forgets them)."""
    state = _loop_state(host)
    if not state.exists():
        return
    info = json.loads(state.read_text())
    _hosts.stop_dockerd(host, signal.SIGTERM)

    # dockerd's containerd and shims exit just after it and hold the mount until then.
    def released() -> bool:
        umount = procs.nsenter_host(host, ["umount", "/var/lib/docker"])
        return procs.run(umount, check=False).returncode == 0

    procs.wait_until(released, 30, f"{host.name}'s small disk to be released", interval=0.2)
    procs.run(["umount", host.data_root])
    procs.run(["losetup", "-d", info["device"]], check=False)
    Path(info["image"]).unlink(missing_ok=True)
    state.unlink()
    start_dockerd(host)


def fill_disk(host: Host, leave_mib: float) -> Path:
    """Fill the filesystem of the host's data root until `leave_mib` MiB are free."""
    filler = Path(host.data_root) / "ferry-test-filler"
    st = os.statvfs(host.data_root)
    free = st.f_bavail * st.f_frsize
    size = free - int(leave_mib * 1024 * 1024)
    if size > 0:
        procs.run(["fallocate", "-l", str(size), str(filler)])
    return filler


def unfill_disk(host: Host) -> None:
    (Path(host.data_root) / "ferry-test-filler").unlink(missing_ok=True)

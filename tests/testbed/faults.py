"""Fault controls for tests: every way a test may break a host, in one place."""

from __future__ import annotations

import signal
import subprocess

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

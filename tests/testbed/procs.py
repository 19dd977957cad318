"""Process and namespace plumbing shared by host lifecycle and fault controls."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.testbed.layout import Host


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def signal_pid(pid: int, sig: int) -> None:
    # 0 means "never started" in state.json; kill(0) would signal our own process group.
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; returns once the process is gone."""
    if not alive(pid):
        return
    signal_pid(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not alive(pid), timeout, f"pid {pid} to exit")
    except TimeoutError:
        signal_pid(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 10, f"pid {pid} to die")


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(netns_path: str) -> list[int]:
    """Every process whose network namespace is this one (agents, dockerd, containers)."""
    ino = netns_inode(netns_path)
    return [] if ino is None else pids_in_netns_inodes({ino})


def pids_in_netns_inodes(inodes: set[int]) -> list[int]:
    if not inodes:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return found


def nsenter_host(host: Host, cmd: list[str]) -> list[str]:
    """Argv that runs `cmd` inside the host's own mount, PID and network namespaces."""
    return ["nsenter", "-t", str(host.init_pid), "-m", "-p", "-n", "-r", "-w", "--", *cmd]


def netns_argv(host: Host, cmd: list[str], extra_env: dict[str, str] | None = None) -> list[str]:
    """Argv that runs `cmd` in the host's network namespace only, with DOCKER_HOST set.

    The root mount namespace is kept, so the caller's venv and files stay usable.
    """
    # This checkout's venv goes first on PATH, so `exec HOST -- ferry ...` finds ferry.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = {
        "DOCKER_HOST": host.docker_host,
        "FERRY_TESTBED_HOST": host.name,
        "PATH": path,
        **(extra_env or {}),
    }
    return [
        "nsenter",
        f"--net={host.netns_path}",
        "env",
        *[f"{k}={v}" for k, v in env.items()],
        *cmd,
    ]

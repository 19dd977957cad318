"""Hold a restored container stopped until the commit, then let it go.

A copy restored with CRIU's `leave-stopped` shows as running in Docker while
every one of its processes is in state T (stopped). While they all are, none
can fork or exit, so one listing of the container's cgroup is complete.
`SIGCONT` to PID 1 alone is not enough: each process was stopped on its own.

Processes are found as agent.procfs finds them, in the agent's own PID namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from agent.procfs import PROC, ProcState, container_processes

__all__ = [
    "HostProcesses",
    "ProcState",
    "ProcessTable",
    "all_stopped",
    "container_processes",
    "continue_all",
    "dump_in_progress",
]


def all_stopped(procs: Iterable[ProcState]) -> bool:
    states = [p.state for p in procs]
    return bool(states) and all(s in ("T", "t") for s in states)


def continue_all(procs: Iterable[ProcState]) -> int:
    """SIGCONT each; returns how many were signalled."""
    count = 0
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
            count += 1
    return count


def dump_in_progress(container_id: str, proc: Path = PROC) -> bool:
    """Is a `runc checkpoint` of this container (Docker's own or ours) still running?"""
    needle = container_id.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"checkpoint" in argv and needle in argv:
            return True
    return False


class ProcessTable(Protocol):
    """What the engine asks of the host's process table (a fake in unit tests)."""

    def processes(self, container_id: str) -> list[ProcState]: ...

    def cont(self, procs: Iterable[ProcState]) -> int: ...

    def dump_in_progress(self, container_id: str) -> bool: ...


class HostProcesses:
    """The real one: this agent's /proc."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc

    def processes(self, container_id: str) -> list[ProcState]:
        return container_processes(container_id, self.proc)

    def cont(self, procs: Iterable[ProcState]) -> int:
        return continue_all(procs)

    def dump_in_progress(self, container_id: str) -> bool:
        return dump_in_progress(container_id, self.proc)

"""What Ferry reads of /proc: a container's processes, and how much a process tree has read.

Standard library only, and outside agent.migration: the page guard
(agent.page_guard) imports it, and it starts on a restore's critical path.
Processes are found through /proc/<pid>/cgroup, which names the container's id
whatever the cgroup layout (v1 cgroupfs `/docker/<id>`, v2 systemd
`docker-<id>.scope`), in the reader's own PID namespace.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcState:
    pid: int
    state: str  # the one-letter state from /proc/<pid>/stat


def container_processes(container_id: str, proc: Path = PROC) -> list[ProcState]:
    """Every process in the container's cgroup, with its state."""
    if len(container_id) < 12:
        raise ValueError(f"container id {container_id!r} is too short to match cgroups safely")
    found: list[ProcState] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue  # gone while we looked
        if container_id not in cgroups:
            continue
        st = stat(int(entry.name), proc)
        if st is not None:
            found.append(ProcState(int(entry.name), st.state))
    return found


@dataclass(frozen=True)
class Stat:
    comm: str
    state: str
    exit_code: int  # as waitpid(2) reports it; set once the process is a zombie


def stat(pid: int, proc: Path = PROC) -> Stat | None:
    """The fields of /proc/<pid>/stat Ferry uses; None once the process is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    comm = text[text.find("(") + 1 : text.rfind(")")]
    rest = text[text.rfind(")") + 2 :].split()
    # exit_code is field 52 (Linux >= 3.5); rest starts at field 3.
    code = int(rest[49]) if len(rest) > 49 else 0
    return Stat(comm, rest[0], code)


def io_counter(pid: int, key: str, proc: Path = PROC) -> int:
    """The `key` counter of /proc/<pid>/io ("rchar:", "wchar:"); 0 once it is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in (proc / str(pid) / "io").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def tree_io(pid: int, key: str, proc: Path = PROC, comm: str | None = None) -> int:
    """io_counter summed over the process and its descendants; with `comm`, only over
    those of that name (a wrapper's own reads of /proc are not progress)."""
    total = 0
    for p in [pid, *descendants(pid, proc)]:
        if comm is None or ((st := stat(p, proc)) is not None and st.comm == comm):
            total += io_counter(p, key, proc)
    return total


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """The process's descendants, children before grandchildren."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop(0)
        with contextlib.suppress(OSError, ValueError):
            for task in (proc / str(p) / "task").iterdir():
                for k in (task / "children").read_text().split():
                    if int(k) not in out:
                        out.append(int(k))
                        todo.append(int(k))
    return out

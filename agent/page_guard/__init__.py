"""Keep a restored copy from running on memory that will never come, with or without the agent.

A lazily restored copy gets its memory pages from a `criu lazy-pages` daemon as
it touches them. If that daemon dies, the kernel drops the copy's userfaultfd
and every page not yet in reads as zeros: the copy runs on, wrong. The agent
watches for that, but the daemon outlives it (it runs in a session of its own,
or as a transient systemd service), so a dead or hung agent would leave such a
copy running, in post-copy beside the source that resumed.

This guard is the daemon's parent and lives where it lives. When the daemon
exits non-zero, reads nothing for --stall seconds once the copy exists, or the
guard itself is told to terminate, it kills every process of the container
before it exits. Docker then shows the copy exited; Ferry keeps the container's
restart policy at "no" until every page is in, so nothing starts it again.

For the agent, which may not see the daemon's processes (systemd-run), it keeps
<work>/guard.json up to date: its token, state, bytes CRIU has read and why it
acted. `<work>/guard-<token>.stop` makes it stop the daemon and exit 143
without touching the container: the agent then decides what happens to it.

    python -m agent.page_guard --work DIR --token T [--container ID] [--stall S] -- CRIU...

This package's entry point imports next to nothing and starts CRIU before it
loads the watch (watch.py): the guard starts on a restore's critical path.

Exit: the daemon's code (0: every page is in), 128+N for a signal, 124 after a
stall, 143 on a stop request or SIGTERM.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: importing typing alone takes longer than Python's start
if TYPE_CHECKING:
    from pathlib import Path

STATUS = "guard.json"
STALLED = 124
STOPPED = 143


def stop_file(work: Path, token: str) -> Path:
    return work / f"guard-{token}.stop"


def pid_namespace() -> str:
    """This process's PID namespace: whether a reader of the status can trust "pid"."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def write_status(work: str, text: str) -> None:
    """Replace <work>/guard.json with `text` in one step (readers never see half of it)."""
    tmp = os.path.join(work, f".{STATUS}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(work, STATUS))
    except OSError:
        pass  # the status is for the agent's progress and stop; the guard goes on


def starting(work: str, token: str) -> None:
    """The first status, written before CRIU starts: the agent may ask this guard to stop
    as soon as CRIU listens, before the watch is loaded. (No json: it costs a start.)"""
    write_status(
        work,
        f'{{"token": "{token}", "pid": {os.getpid()}, "pidns": "{pid_namespace()}", '
        '"state": "running", "read": 0}',
    )


def spawn(command: list[str]) -> int:
    """Start the daemon (stdin and stdout on /dev/null); its pid."""
    null = os.devnull
    return os.posix_spawnp(
        command[0],
        command,
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
        ],
    )

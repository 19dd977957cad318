"""One `criu lazy-pages` daemon: started, watched, killed and explained the same way
for the local lazy restore (pages from this host's disk) and for post-copy (pages
pulled from the source's page server).

It runs in a session of its own, so that killing its process group also reaches
criu when a wrapper (nsenter -p, systemd-run) forked it. Its process group is
written next to its socket: an agent that restarts finds and kills an orphan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

SOCKET = "lazy-pages.socket"
LOG = "lazy-pages.log"
PIDFILE = "daemon.pgid"


class DaemonError(Exception):
    """The daemon could not start; the message says why, with CRIU's own words."""


def is_error(line: str) -> bool:
    """A CRIU log line that says what went wrong."""
    # CRIU logs this as an error on hosts without CAP_SYS_RESOURCE; it is harmless.
    return "Error (" in line and "RLIMIT_NOFILE" not in line


def kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class LazyPagesDaemon:
    """`<criu_command> lazy-pages <args> -W <work> -o lazy-pages.log -v2`."""

    def __init__(self, criu_command: Sequence[str], work: Path, work_daemon: str) -> None:
        self.criu_command = list(criu_command)
        self.work = work  # as this agent sees it
        self.work_daemon = work_daemon  # as CRIU (beside dockerd) sees it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, args: Sequence[str], timeout: float) -> None:
        """Start it; return once it listens on its socket."""
        self.stop()
        self.kill_orphan()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / SOCKET).unlink(missing_ok=True)
        argv = [
            *self.criu_command,
            "lazy-pages",
            *args,
            "-W",
            self.work_daemon,
            "-o",
            LOG,
            "-v2",
        ]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise DaemonError(f"cannot run {argv[0]}: {exc}") from exc
        (self.work / PIDFILE).write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while not (self.work / SOCKET).exists():
            if self.proc.poll() is not None:
                raise DaemonError(
                    f"criu lazy-pages exited {self.proc.returncode} before listening: "
                    f"{self.error_words()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError(f"criu lazy-pages did not listen within {timeout:.0f}s")
            time.sleep(0.01)

    def poll(self) -> int | None:
        """Its exit code; None while it runs, or when none was started here."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        kill_group(proc)

    def kill_orphan(self) -> None:
        """Kill a daemon an earlier agent left running in this work dir, if any."""
        try:
            pgid = int((self.work / PIDFILE).read_text().strip())
        except (OSError, ValueError):
            return
        if self.proc is not None and self.proc.pid == pgid:
            return
        if any(_is_lazy_daemon(pid, pgid) for pid in _pids()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        (self.work / PIDFILE).unlink(missing_ok=True)

    def error_words(self) -> str:
        """CRIU's first error lines (or its last lines), and where its log is."""
        where = self.work / LOG
        try:
            text = where.read_text(errors="replace")
        except OSError:
            return f"no log ({where})"
        lines = [ln.strip() for ln in text.splitlines() if is_error(ln)][:2]
        return "; ".join(lines or text.splitlines()[-2:] or ["empty log"]) + f" (log {where})"


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _is_lazy_daemon(pid: int, pgid: int) -> bool:
    """`pid` is in process group `pgid` and is a criu lazy-pages (or its wrapper)."""
    try:
        if os.getpgid(pid) != pgid:
            return False
        return b"lazy-pages" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ProcessLookupError):
        return False

"""One `criu lazy-pages` daemon: started, watched, killed and explained the same way
for the local lazy restore (pages from this host's disk) and for post-copy (pages
pulled from the source's page server).

It runs under a page guard (agent.page_guard), which kills the copy the daemon
fills if the daemon fails while this agent is dead or hung. The guard runs
where CRIU runs: inside systemd-run when docker.criu_command starts with it (a
transient service outlives the agent's unit), else around the whole command,
in a session of its own, so that killing its process group also reaches criu
when a wrapper (nsenter -p) forked it. The process group is written next to
the socket: an agent that restarts finds and kills an orphan. A guard inside
systemd-run is out of reach of signals: it is asked through a stop file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import agent
from agent import page_guard, procfs

SOCKET = "lazy-pages.socket"
LOG = "lazy-pages.log"
PIDFILE = "daemon.pgid"
# Where the agent package lives, for a guard started by systemd-run (which does not
# pass this process's environment on).
PACKAGE_ROOT = str(Path(agent.__file__).resolve().parent.parent)
# systemd-run options that take their value as the next word.
_SYSTEMD_RUN_VALUED = frozenset(
    (
        "-p",
        "--property",
        "-E",
        "--setenv",
        "-u",
        "--unit",
        "--slice",
        "--description",
        "-M",
        "--machine",
        "-H",
        "--host",
        "--uid",
        "--gid",
        "--nice",
        "--working-directory",
    )
)


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


def split_systemd_run(command: Sequence[str]) -> tuple[list[str], list[str]]:
    """(systemd-run and its options, the command it runs); ([], command) without it."""
    words = list(command)
    if not words or Path(words[0]).name != "systemd-run":
        return [], words
    i = 1
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in _SYSTEMD_RUN_VALUED else 1
    return words[:i], words[i:]


class LazyPagesDaemon:
    """`<criu_command> lazy-pages <args> -W <work> -o lazy-pages.log -v2`, under a guard."""

    def __init__(
        self,
        criu_command: Sequence[str],
        work: Path,
        work_daemon: str,
        container_id: str | None = None,
        stall: float = 0.0,
    ) -> None:
        self.criu_command = list(criu_command)
        self.work = work  # as this agent sees it
        self.work_daemon = work_daemon  # as CRIU (beside dockerd) sees it
        self.container_id = container_id  # the copy the guard kills if the daemon fails
        self.stall = stall  # 0: a daemon that reads nothing is not a failure
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def argv(self, args: Sequence[str]) -> list[str]:
        """The guard and, under it, the daemon; the guard runs where CRIU runs."""
        criu = [
            "lazy-pages",
            *args,
            "-W",
            self.work_daemon,
            "-o",
            LOG,
            "-v2",
        ]
        outside, inner = split_systemd_run(self.criu_command)
        guard = [
            sys.executable,
            "-S",  # no site: PYTHONPATH names the package, and it starts on the restore's path
            "-m",
            "agent.page_guard",
            "--work",
            self.work_daemon if outside else str(self.work),
            "--token",
            self.token,
            "--stall",
            str(self.stall),
        ]
        if self.container_id:
            guard += ["--container", self.container_id]
        if outside:
            prefix = with_env(outside, "PYTHONPATH", PACKAGE_ROOT)
            return [*prefix, *guard, "--", *inner, *criu]
        return [*guard, "--", *self.criu_command, *criu]

    def start(self, args: Sequence[str], timeout: float) -> None:
        """Start it; return once it listens on its socket."""
        self.stop()
        self.kill_orphan()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / SOCKET).unlink(missing_ok=True)
        (self.work / page_guard.STATUS).unlink(missing_ok=True)
        self.token = secrets.token_hex(6)
        argv = self.argv(args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
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
            time.sleep(0.002)  # on the downtime path: CRIU listens within tens of ms

    def poll(self) -> int | None:
        """Its exit code; None while it runs, or when none was started here."""
        return None if self.proc is None else self.proc.poll()

    def pulled(self) -> int:
        """Bytes CRIU has read so far: the guard's count, which sees CRIU wherever it runs."""
        status = self.guard_status()
        if status is not None and status.get("token") == self.token:
            return int(str(status.get("read") or 0))
        if self.proc is None:
            return 0
        return procfs.tree_io(self.proc.pid, "rchar:", comm="criu")

    def guard_status(self) -> dict[str, object] | None:
        try:
            status = json.loads((self.work / page_guard.STATUS).read_text())
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._ask_guard_to_stop(self.token)
        kill_group(proc)
        self._wait_guard_gone(self.token)

    def kill_orphan(self) -> None:
        """Kill a daemon an earlier agent left running in this work dir, if any."""
        status = self.guard_status()
        token = str((status or {}).get("token") or "")
        if status is not None and status.get("state") == "running" and token != self.token:
            # Possibly under systemd-run, beyond our signals: ask, then wait.
            self._ask_guard_to_stop(token)
            self._wait_guard_gone(token)
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

    def _ask_guard_to_stop(self, token: str) -> None:
        if token:
            with contextlib.suppress(OSError):
                page_guard.stop_file(self.work, token).write_text("stop\n")

    def _wait_guard_gone(self, token: str, timeout: float = 5.0) -> None:
        """Until the guard with this token has stopped (or is not there to say so)."""
        if not token:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.guard_status()
            if status is None or status.get("token") != token or status.get("state") != "running":
                break
            if status.get("pidns") == page_guard.pid_namespace() and not _alive(
                int(str(status.get("pid") or 0)), token
            ):
                break  # died without saying so (killed with its process group)
            time.sleep(0.02)
        page_guard.stop_file(self.work, token).unlink(missing_ok=True)

    def error_words(self) -> str:
        """What the guard did, CRIU's first error lines (or its last lines), and its log."""
        status = self.guard_status() or {}
        acted = f"{status['reason']}; " if status.get("reason") else ""
        where = self.work / LOG
        try:
            text = where.read_text(errors="replace")
        except OSError:
            return f"{acted}no log ({where})"
        lines = [ln.strip() for ln in text.splitlines() if is_error(ln)][:2]
        words = "; ".join(lines or text.splitlines()[-2:] or ["empty log"])
        return f"{acted}{words} (log {where})"


def with_env(command: Sequence[str], name: str, value: str) -> list[str]:
    """`command` such that the program it runs sees `name`=`value` in its environment.

    systemd-run starts its command as a transient service of systemd's, with
    systemd's environment, not its caller's: without --setenv, CRIU would not see
    its TLS options (and would serve pages to anyone who connects), nor a guard
    its package. Other wrappers (nsenter, env) pass the caller's environment on.
    """
    out = list(command)
    for i, word in enumerate(out):
        if Path(word).name == "systemd-run":
            out.insert(i + 1, f"--setenv={name}={value}")
            break
    return out


def _alive(pid: int, token: str) -> bool:
    """A guard with this token runs as `pid` in our PID namespace (False: not seen)."""
    if pid <= 0:
        return False
    try:
        return token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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

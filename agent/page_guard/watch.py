"""The page guard's watch: the daemon's exit, CRIU's progress, the copy's processes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from pathlib import Path
from types import FrameType

from agent import procfs
from agent.page_guard import STALLED, STOPPED, pid_namespace, spawn, stop_file, write_status

TICK = 0.1


class Guard:
    def __init__(
        self,
        command: list[str],
        work: Path,
        token: str,
        container: str | None,
        stall: float,
        proc: Path = procfs.PROC,  # where the container's processes are looked up
        child: int | None = None,  # the daemon, when already started (else run starts it)
    ) -> None:
        self.command = command
        self.work = work
        self.token = token
        self.container = container
        self.stall = stall
        self.proc = proc
        self.child = child
        self.returncode: int | None = None
        self.read = 0
        self.terminated = False
        self._pidfds: list[int] = []  # the wrapper's, then CRIU's: readable once they exit
        self._fired: set[int] = set()

    def run(self) -> int:
        try:
            return self._run()
        finally:
            for fd in self._pidfds:
                os.close(fd)
            self._pidfds = []

    def poll(self) -> int | None:
        """The daemon's exit code (negative: the signal that ended it); None while it runs."""
        if self.returncode is None and self.child is not None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.child, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def _run(self) -> int:
        if self.child is None:
            self.child = spawn(self.command)
        self._write("running")
        armed_at: float | None = None  # the stall clock runs once the copy exists
        last_change = time.monotonic()
        while True:
            if self.terminated:
                return self._fail("the page guard was told to terminate", STOPPED)
            if stop_file(self.work, self.token).exists():
                self._kill_daemon()
                self._write("stopped", "the agent stopped the daemon")
                stop_file(self.work, self.token).unlink(missing_ok=True)
                return STOPPED
            rc = self.poll()
            if rc == 0:
                self._write("done")
                return 0
            if rc is not None:
                return self._fail(f"criu lazy-pages exited {rc}", 128 - rc if rc < 0 else rc)
            criu = self._criu()
            dead = _dead_criu(criu)
            if dead is not None:
                # Its wrapper has not said so (nsenter stops itself when CRIU was
                # stopped, and then never reaps it): CRIU's own exit status decides.
                return self._fail(dead[0], dead[1])
            now = time.monotonic()
            read = sum(procfs.io_counter(pid, "rchar:") for pid, _ in criu)
            if read != self.read:
                self.read, last_change = read, now
                self._write("running")
            if self.stall > 0 and armed_at is None and self._copy_exists():
                armed_at = last_change = now
            if armed_at is not None and now - last_change > self.stall:
                return self._fail(f"no page arrived for {self.stall:g}s", STALLED)
            self._wait(criu)

    def _criu(self) -> list[tuple[int, procfs.Stat]]:
        """CRIU's processes: the child itself, or under a wrapper (nsenter -p forks)."""
        assert self.child is not None
        out = []
        for pid in [self.child, *procfs.descendants(self.child)]:
            st = procfs.stat(pid)
            if st is not None and st.comm == "criu":
                out.append((pid, st))
        return out

    def _wait(self, criu: list[tuple[int, procfs.Stat]]) -> None:
        """One tick, cut short the moment the wrapper or CRIU exits (pidfds): the kernel
        hands the copy zero pages as soon as CRIU's userfaultfd closes, so every
        millisecond before the kill counts."""
        assert self.child is not None
        if not self._pidfds:
            with contextlib.suppress(OSError):
                self._pidfds.append(os.pidfd_open(self.child))
        under = [pid for pid, _ in criu if pid != self.child]
        if len(self._pidfds) < 2 and under:
            with contextlib.suppress(OSError):
                self._pidfds.append(os.pidfd_open(under[0]))
        # One that fired stays readable: wait on it once, then on the clock.
        waiting = [fd for fd in self._pidfds if fd not in self._fired]
        if waiting:
            ready, _, _ = select.select(waiting, [], [], TICK)
            self._fired.update(ready)
        else:
            time.sleep(TICK)

    def terminate(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True

    def _copy_exists(self) -> bool:
        return bool(self.container) and bool(self._container_pids())

    def _container_pids(self) -> list[int]:
        if not self.container:
            return []
        procs = procfs.container_processes(self.container, self.proc)
        return [p.pid for p in procs if p.state != "Z"]  # a zombie is dead, only unreaped

    def _fail(self, why: str, code: int) -> int:
        # The copy first: a daemon that goes first would let it read zero pages.
        killed = self._kill_copy()
        self._kill_daemon()
        what = f"killed {killed} process(es) of the copy" if killed else "no copy was running"
        self._write("failed", f"{why}; {what}")
        return code

    def _kill_copy(self) -> int:
        """SIGKILL the container's processes until none is left (a fork may race us)."""
        killed: set[int] = set()
        deadline = time.monotonic() + 10.0
        while (pids := self._container_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.02)
        return len(killed)

    def _kill_daemon(self) -> None:
        if self.child is None or self.poll() is not None:
            return
        # Children first (a wrapper such as nsenter -p forks CRIU), then the wrapper.
        for pid in [*reversed(procfs.descendants(self.child)), self.child]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write(self, state: str, reason: str = "") -> None:
        body = {
            "token": self.token,
            "pid": os.getpid(),
            "pidns": pid_namespace(),
            "state": state,
            "read": self.read,
        }
        if reason:
            body["reason"] = reason
        write_status(str(self.work), json.dumps(body))


def _dead_criu(criu: list[tuple[int, procfs.Stat]]) -> tuple[str, int] | None:
    """A CRIU that ended badly, its wrapper not yet saying so: (why, exit code)."""
    for _, st in criu:
        if st.state != "Z" or st.exit_code == 0:
            continue
        sig, code = st.exit_code & 0x7F, st.exit_code >> 8 & 0xFF
        if sig:
            return f"criu lazy-pages was killed by signal {sig}", 128 + sig
        return f"criu lazy-pages exited {code}", code
    return None

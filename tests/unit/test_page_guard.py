"""The page guard: it kills the copy when its lazy-pages daemon fails, with no agent around.

The daemon is a stand-in script named `criu` (so its comm is "criu"), and the
container's processes are sleepers listed in a fixture /proc whose `stat` links
to the real one: the guard sees them die as it would see a container's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import page_guard, procfs
from agent.migration.lazy_daemon import (
    PACKAGE_ROOT,
    SOCKET,
    LazyPagesDaemon,
    split_systemd_run,
)
from agent.page_guard import __main__ as guard_main
from agent.page_guard.watch import Guard
from tests.helpers import wait_for

CID = "c0ffee" * 10 + "beef"
RUN_OUTSIDE = ["systemd-run", "--quiet", "--wait", "--pipe", "--property=RuntimeMaxSec=10min"]


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def criu_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def fake_criu(d: Path, body: str) -> list[str]:
    """A daemon stand-in; it gets `lazy-pages ... -W <work> ...` like CRIU."""
    return [str(_script(d / "criu", "import sys, time, pathlib\n" + body))]


LISTEN_THEN = (
    "argv = sys.argv\npathlib.Path(argv[argv.index('-W') + 1], 'lazy-pages.socket').touch()\n"
)


class Copy:
    """Processes standing in for a restored container, in a fixture /proc."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, n: int = 2) -> None:
        for _ in range(n):
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            self.procs.append(p)
            entry = self.root / str(p.pid)
            entry.mkdir()
            (entry / "cgroup").write_text(f"0::/system.slice/docker-{CID}.scope\n")
            (entry / "stat").symlink_to(f"/proc/{p.pid}/stat")

    def alive(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def copy(tmp_path: Path) -> Iterator[Copy]:
    c = Copy(tmp_path / "proc")
    yield c
    c.close()


def _run(guard: Guard) -> tuple[threading.Thread, list[int]]:
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(guard.run()))
    t.start()
    return t, out


def _status(work: Path) -> dict[str, object]:
    return dict(json.loads((work / page_guard.STATUS).read_text()))


def _guard(tmp_path: Path, command: list[str], copy: Copy, stall: float = 0.0) -> Guard:
    return Guard(command, tmp_path, "t0k", CID, stall, proc=copy.root)


def test_a_daemon_that_fails_takes_the_copy_with_it(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    copy.spawn()
    trigger = tmp_path / "fail-now"
    body = f"while not pathlib.Path({str(trigger)!r}).exists(): time.sleep(0.01)\nsys.exit(3)\n"
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, body), copy))
    wait_for(lambda: (tmp_path / page_guard.STATUS).exists(), timeout=10, what="the guard")
    assert len(copy.alive()) == 2  # a healthy daemon: the copy runs
    trigger.touch()
    t.join(timeout=30)
    assert out == [3]
    wait_for(lambda: not copy.alive(), timeout=10, what="the copy to be killed")
    status = _status(tmp_path)
    assert status["state"] == "failed"
    assert "criu lazy-pages exited 3; killed 2 process(es)" in str(status["reason"])


def test_a_criu_its_wrapper_never_reaps_is_judged_by_its_own_exit_status(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    """nsenter stops itself when its CRIU is stopped, and then never reaps it: the guard
    reads the zombie CRIU's status rather than wait for the wrapper."""
    copy.spawn(1)
    criu = fake_criu(criu_dir, "time.sleep(300)\n")
    wrapper = _script(
        criu_dir / "wrapper",
        f"import subprocess, time\nsubprocess.Popen({criu!r})\ntime.sleep(300)\n",
    )
    t, out = _run(_guard(tmp_path, [str(wrapper)], copy))
    wait_for(lambda: _criu_under(os.getpid()), timeout=10, what="the fake criu")
    for pid in _criu_under(os.getpid()):
        os.kill(pid, signal.SIGKILL)
    t.join(timeout=30)
    assert out == [128 + signal.SIGKILL]
    assert not copy.alive()
    assert "criu lazy-pages was killed by signal 9" in str(_status(tmp_path)["reason"])


def _criu_under(pid: int) -> list[int]:
    return [p for p in procfs.descendants(pid) if (st := procfs.stat(p)) and st.comm == "criu"]


def test_a_daemon_that_filled_every_page_leaves_the_copy_alone(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    copy.spawn()
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, "sys.exit(0)\n"), copy))
    t.join(timeout=30)
    assert out == [0]
    assert len(copy.alive()) == 2
    assert _status(tmp_path)["state"] == "done"


def test_a_daemon_killed_by_a_signal_counts_as_failed(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    copy.spawn(1)
    body = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, body), copy))
    t.join(timeout=30)
    assert out == [128 + signal.SIGKILL]
    wait_for(lambda: not copy.alive(), timeout=10, what="the copy to be killed")


def test_reading_nothing_for_the_stall_timeout_kills_daemon_and_copy(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    marker = tmp_path / "daemon-pid"
    body = (
        f"import os\npathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\ntime.sleep(300)\n"
    )
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, body), copy, stall=0.3))
    wait_for(lambda: marker.exists() and marker.read_text(), timeout=10, what="the daemon")
    # No copy yet (the restore has not made it): a daemon that waits is not stalled.
    t.join(timeout=1.0)
    assert t.is_alive()
    copy.spawn()
    t.join(timeout=30)
    assert out == [page_guard.STALLED]
    assert not copy.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)
    assert "no page arrived for 0.3s" in str(_status(tmp_path)["reason"])


def test_progress_is_what_criu_read_and_keeps_the_stall_clock_back(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    copy.spawn(1)
    stop = tmp_path / "stop-reading"
    body = (
        f"while not pathlib.Path({str(stop)!r}).exists():\n"
        "    open('/dev/zero', 'rb').read(4096)\n"
        "    time.sleep(0.05)\n"
        "sys.exit(0)\n"
    )
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, body), copy, stall=0.5))
    wait_for(lambda: int(str(_status(tmp_path)["read"])) >= 40960, timeout=20, what="progress")
    stop.touch()
    t.join(timeout=30)
    assert out == [0]  # it kept reading: never stalled
    assert copy.alive()


def test_a_stop_request_ends_the_daemon_and_leaves_the_copy_to_the_agent(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    copy.spawn(1)
    t, out = _run(_guard(tmp_path, fake_criu(criu_dir, "time.sleep(300)\n"), copy, stall=60))
    wait_for(lambda: (tmp_path / page_guard.STATUS).exists(), timeout=10, what="the guard")
    page_guard.stop_file(tmp_path, "t0k").write_text("stop\n")
    t.join(timeout=30)
    assert out == [page_guard.STOPPED]
    assert copy.alive()
    assert _status(tmp_path)["state"] == "stopped"
    assert not page_guard.stop_file(tmp_path, "t0k").exists()


def test_told_to_terminate_it_kills_the_copy_too(
    tmp_path: Path, criu_dir: Path, copy: Copy
) -> None:
    """systemd stopping the daemon's unit (RuntimeMaxSec, shutdown) ends the daemon: the
    copy must not run on without it."""
    copy.spawn()
    guard = _guard(tmp_path, fake_criu(criu_dir, "time.sleep(300)\n"), copy)
    t, out = _run(guard)
    wait_for(lambda: (tmp_path / page_guard.STATUS).exists(), timeout=10, what="the guard")
    guard.terminate(signal.SIGTERM, None)
    t.join(timeout=30)
    assert out == [page_guard.STOPPED]
    assert not copy.alive()
    assert "told to terminate" in str(_status(tmp_path)["reason"])


# ------------------------------------------------------------ how the agent starts it


def test_the_guard_runs_inside_systemd_run_and_around_other_wrappers(tmp_path: Path) -> None:
    d = LazyPagesDaemon([*RUN_OUTSIDE, "criu"], tmp_path, "/daemon/work", CID, 30.0)
    d.token = "tok"
    argv = d.argv(["-D", "/img"])
    guard_at = argv.index("agent.page_guard")
    assert argv[:2] == ["systemd-run", f"--setenv=PYTHONPATH={PACKAGE_ROOT}"]
    assert argv[2 : len(RUN_OUTSIDE) + 1] == RUN_OUTSIDE[1:]
    assert argv[guard_at - 3 : guard_at] == [sys.executable, "-S", "-m"]
    assert argv[argv.index("--work") + 1] == "/daemon/work"  # CRIU's view: it runs there
    assert argv[argv.index("--") + 1 :][:2] == ["criu", "lazy-pages"]
    assert argv[argv.index("--container") + 1] == CID

    d = LazyPagesDaemon(["nsenter", "-t", "1", "-m", "-p", "criu"], tmp_path, "/d", None)
    d.token = "tok"
    argv = d.argv([])
    assert argv[:4] == [sys.executable, "-S", "-m", "agent.page_guard"]
    assert argv[argv.index("--work") + 1] == str(tmp_path)  # ours: it runs beside us
    assert argv[argv.index("--") + 1 :][:2] == ["nsenter", "-t"]
    assert "--container" not in argv


@pytest.mark.parametrize(
    ("command", "outside", "inner"),
    [
        (["criu"], [], ["criu"]),
        (["/usr/bin/systemd-run", "--wait", "criu"], ["/usr/bin/systemd-run", "--wait"], ["criu"]),
        (
            ["systemd-run", "-p", "A=b", "--pipe", "criu", "-v"],
            ["systemd-run", "-p", "A=b", "--pipe"],
            ["criu", "-v"],
        ),
    ],
)
def test_split_systemd_run(command: list[str], outside: list[str], inner: list[str]) -> None:
    assert split_systemd_run(command) == (outside, inner)


def test_the_agent_stops_a_guard_beyond_its_signals_through_the_stop_file(
    tmp_path: Path, criu_dir: Path
) -> None:
    """Like systemd-run: the guard runs detached from the process the agent started, so
    killing that process group does not reach it."""
    fake_run = _script(
        criu_dir / "systemd-run",
        "import subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "while args[0].startswith('-'):\n"
        "    args.pop(0)\n"
        "sys.exit(subprocess.Popen(args, start_new_session=True).wait())\n",
    )
    body = LISTEN_THEN + "time.sleep(300)\n"
    criu = fake_criu(criu_dir, body)
    work = tmp_path / "work"
    d = LazyPagesDaemon([str(fake_run), "--wait", *criu], work, str(work), None)
    d.start([], timeout=20)
    assert (work / SOCKET).exists()
    status = d.guard_status()
    assert status is not None and status["state"] == "running"
    guard_pid = int(str(status["pid"]))
    d.stop()
    after = d.guard_status() or {}
    assert (after["state"], after["reason"]) == ("stopped", "the agent stopped the daemon")
    wait_for(lambda: not Path(f"/proc/{guard_pid}").exists(), timeout=10, what="the guard gone")


def test_a_daemon_started_here_reports_what_criu_read(tmp_path: Path, criu_dir: Path) -> None:
    body = (
        LISTEN_THEN
        + "open('/dev/zero', 'rb').read(1 << 20)\n"
        + "while not pathlib.Path(argv[argv.index('-W') + 1], 'go').exists():\n"
        + "    time.sleep(0.01)\n"
    )
    work = tmp_path / "work"
    d = LazyPagesDaemon(fake_criu(criu_dir, body), work, str(work), None)
    d.start([], timeout=20)
    wait_for(lambda: d.pulled() >= 1 << 20, timeout=10, what="the read to show")
    (work / "go").touch()
    assert wait_for(lambda: d.poll() is not None, timeout=10, what="the daemon to end")
    assert d.poll() == 0
    d.stop()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--work", "/w", "--", "criu"],  # no token
        ["--work", "/w", "--token", "t", "criu"],  # no "--" before the command
        ["--work", "/w", "--token", "t", "--"],  # no command
        ["--work", "/w", "--token", "t", "--stall", "soon", "--", "criu"],
        ["--work", "/w", "--token", "t", "--what", "x", "--", "criu"],
        ["--work", "/w", "--token", "a/b", "--", "criu"],
    ],
)
def test_the_entry_point_refuses_what_it_cannot_run(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert guard_main.main(argv) == 2
    assert "usage: python -m agent.page_guard" in capsys.readouterr().err


def test_the_entry_point_runs_the_command_under_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # not pytest's handlers
    argv = ["--work", str(tmp_path), "--token", "t", "--stall", "5", "--", "true"]
    assert guard_main.main(argv) == 0
    assert _status(tmp_path)["state"] == "done"


def test_a_command_that_cannot_run_is_said_in_the_status(tmp_path: Path) -> None:
    argv = ["--work", str(tmp_path), "--token", "t", "--", str(tmp_path / "no-criu")]
    assert guard_main.main(argv) == 127
    status = _status(tmp_path)
    assert status["state"] == "failed"
    assert f"cannot run {tmp_path / 'no-criu'}" in str(status["reason"])

"""The lazy-pages daemon helper: orphans found by process group, CRIU's words picked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.migration.lazy_daemon import LOG, PIDFILE, LazyPagesDaemon, is_error
from tests.helpers import wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        p.kill()
        p.wait()


def _spawn(procs: list[subprocess.Popen[bytes]], *extra: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*SLEEPER, *extra], start_new_session=True)
    procs.append(p)
    # Popen can return while the kernel still shows an empty command line.
    cmdline = Path(f"/proc/{p.pid}/cmdline")
    wait_for(lambda: cmdline.read_bytes().endswith(b"\0"), timeout=10, what="the exec")
    return p


def test_an_orphan_daemon_of_this_work_dir_is_killed(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    orphan = _spawn(procs, "lazy-pages")  # what a killed agent left running
    (tmp_path / PIDFILE).write_text(str(orphan.pid))
    LazyPagesDaemon(["criu"], tmp_path, "/w").kill_orphan()
    wait_for(lambda: orphan.poll() is not None, timeout=10, what="the orphan to die")
    assert not (tmp_path / PIDFILE).exists()


def test_a_reused_pid_that_is_no_daemon_is_left_alone(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = _spawn(procs)  # the pid was reused by something else
    (tmp_path / PIDFILE).write_text(str(other.pid))
    LazyPagesDaemon(["criu"], tmp_path, "/w").kill_orphan()
    assert other.poll() is None


def test_a_daemon_that_cannot_listen_says_criu_s_error(tmp_path: Path) -> None:
    (tmp_path / LOG).write_text(
        "(00.001) Error (criu/util.c:1): Can't set RLIMIT_NOFILE\n"
        "(00.002) uffd: lazy-pages: starting\n"
        "(00.003) Error (criu/uffd.c:2): uffd: Can't read pages\n"
    )
    words = LazyPagesDaemon(["criu"], tmp_path, "/w").error_words()
    assert "Can't read pages" in words and "RLIMIT" not in words, words
    assert str(tmp_path / LOG) in words
    assert not is_error("(00.001) Error (criu/util.c:1): Can't set RLIMIT_NOFILE")

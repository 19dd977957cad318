"""Command (custom plugin) monitors: exit code mapping, reason, timeout, cleanup on cancel."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.signals.command import (
    OK,
    PROBLEM,
    UNKNOWN,
    CommandMonitorSpec,
    CommandSource,
)
from agent.signals.store import SignalStore
from tests.helpers import run_async, wait_for


def check(command: str | list[str], timeout: float = 10.0) -> tuple[float, str, int | None]:
    source = CommandSource(CommandMonitorSpec("t", command, interval=60, timeout=timeout))
    result = run_async(source.check())
    return result.value, result.reason, result.exit_code


@pytest.mark.parametrize(
    ("script", "value", "code"),
    [
        ("exit 0", OK, 0),
        ("exit 1", PROBLEM, 1),
        ("exit 2", UNKNOWN, 2),
        ("exit 42", UNKNOWN, 42),
        ("kill -TERM $$", UNKNOWN, -15),  # killed by a signal: negative returncode
    ],
)
def test_exit_code_mapping(script: str, value: float, code: int) -> None:
    assert check(script)[0::2] == (value, code)


def test_reason_is_first_nonempty_line_of_stdout_or_stderr() -> None:
    assert check("printf '\\n  disk /data 97%% full  \\nsecond\\n'; exit 1")[:2] == (
        PROBLEM,
        "disk /data 97% full",
    )
    assert check("echo 'ntp unreachable' >&2; exit 1")[1] == "ntp unreachable"
    assert check(["/bin/sh", "-c", "echo argv form"])[:2] == (OK, "argv form")


def test_timeout_is_unknown_and_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    value, reason, code = check(f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.3)
    assert time.monotonic() - started < 5
    assert (value, code) == (UNKNOWN, None)
    assert "timed out" in reason
    child = int(pidfile.read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="grandchild sleep killed")


def test_missing_program_is_unknown() -> None:
    value, reason, code = check(["/nonexistent/ferry-check"])
    assert (value, code) == (UNKNOWN, None)
    assert "cannot start" in reason


def test_run_publishes_and_cancel_kills_running_script(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    pidfile = tmp_path / "pid"
    # First run reports a problem; later runs hang until cancelled.
    script = (
        f"if [ -e {marker} ]; then echo $$ > {pidfile}; exec sleep 30; fi; "
        f"touch {marker}; echo 'raid degraded'; exit 1"
    )
    store = SignalStore(default_max_age=None)
    source = CommandSource(CommandMonitorSpec("raid", script, interval=0.01, timeout=60))

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        # The hanging second run has started once its pid is written.
        await asyncio.to_thread(wait_for, lambda: pidfile.read_text().strip(), 5)
        assert store.value("command.raid") == PROBLEM
        assert store.reason("command.raid") == "raid degraded"
        sample = store.sample("command.raid")
        assert sample is not None and sample.labels["exit_code"] == "1"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(main())
    pid = int(pidfile.read_text())
    wait_for(lambda: not _alive(pid), timeout=5, what="script killed on cancel")


def test_staleness_hint_covers_interval_plus_timeout() -> None:
    source = CommandSource(CommandMonitorSpec("x", "true", interval=30, timeout=10))
    (age,) = source.max_ages().values()
    assert age is not None and age > 40


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie nobody has reaped yet (e.g. no init in a container) is dead too.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

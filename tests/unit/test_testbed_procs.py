"""Testbed process plumbing that must never hit the caller."""

from __future__ import annotations

import signal
from types import FrameType

from tests.testbed import procs


def test_signal_pid_ignores_pids_that_name_no_single_process() -> None:
    # state.json says 0 for a host whose init never started; kill(0) would signal
    # our own process group (it once SIGKILLed pytest from a `down`).
    got: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        got.append(signum)

    old = signal.signal(signal.SIGUSR1, record)
    try:
        procs.signal_pid(0, signal.SIGUSR1)
        procs.signal_pid(-1, signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == []

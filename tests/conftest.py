"""Suite-wide fixtures: every test is checked for leaked threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.testbed.pytest_plugin"]

# Threads that libraries start once per process and keep by design.
_ALLOWED_THREAD_PREFIXES = ("pytest_timeout", "ThreadPoolExecutor", "asyncio_")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(_ALLOWED_THREAD_PREFIXES)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # threads get a grace period to finish their shutdown
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"

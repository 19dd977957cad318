"""Progress lines for long testbed operations (stderr, so `status` JSON stays clean)."""

from __future__ import annotations

import sys
import time

_START = time.monotonic()


def step(message: str) -> None:
    print(f"[testbed {time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)

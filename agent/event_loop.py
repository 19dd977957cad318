"""The agent's event loop: uvloop where it is installed, asyncio's own otherwise.

The agent's hot path is TLS: the target decrypts the state stream on its loop.
asyncio's TLS transport copies every record through memory BIOs in Python;
uvloop's does it in Cython, and on the testbed it moved the state channel
faster at the same CPU (README, "Figures measured"). The choice is logged at
start; FERRY_EVENT_LOOP=asyncio selects asyncio's loop, as when uvloop cannot
be imported (the agent then runs as before, only slower).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "FERRY_EVENT_LOOP"


def loop_factory(
    environ: dict[str, str] | None = None,
) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """(factory or None for asyncio's, what was chosen and why)."""
    choice = (environ if environ is not None else os.environ).get(ENV, "auto").lower()
    if choice == "asyncio":
        return None, f"asyncio ({ENV}=asyncio)"
    if choice not in ("auto", "uvloop"):
        return None, f"asyncio ({ENV}={choice!r} is not uvloop or asyncio)"
    try:
        import uvloop
    except ImportError as exc:
        return None, f"asyncio (uvloop cannot be imported: {exc})"
    return uvloop.new_event_loop, "uvloop"


def run(main: Callable[[], Coroutine[Any, Any, T]], on_choice: Callable[[str], None]) -> T:
    """Run `main()` to completion on the chosen loop; `on_choice` hears which one."""
    factory, chosen = loop_factory()
    on_choice(chosen)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())

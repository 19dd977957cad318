"""Fault-injection gates for end-to-end tests.

While `<state_dir>/hooks/<name>` exists, the engine stops at that point of a
migration after writing `<name>.reached`, until the file is removed (or
HOOK_MAX_WAIT passes). Tests use this to break a host, or kill an agent, at
an exact moment. Only root can create files in the state dir, and nothing
waits when the directory is empty.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import structlog

from agent.model import Clock

log = structlog.get_logger(__name__)

HOOKS_DIR = "hooks"
HOOK_MAX_WAIT = 300.0
# source: checkpoint taken; with runc its page images may already be on their way
AFTER_FREEZE = "after-freeze"
BEFORE_RESTORE = "before-restore"  # target: state unpacked, container not started
MID_TRANSFER = "mid-transfer"  # source: the first MID_TRANSFER_BYTES of state are sent
BEFORE_DECISION = "before-decision"  # source: target holds its copy stopped; nothing decided
AFTER_DECISION = "after-decision"  # source: "commit" journalled, not yet sent
BEFORE_CONTINUE = "before-continue"  # target: commit received, processes still stopped
LAZY_DAEMON = "lazy-daemon"  # target: lazy-pages daemon listening, restore not started
POSTCOPY_STARTED = "postcopy-started"  # target: post-copy copy running, not yet journalled
MID_TRANSFER_BYTES = 8 << 20


def _reach(state_dir: Path, name: str, info: dict[str, Any]) -> Path | None:
    """The gate's file if it is armed, after saying so (`<name>.reached`, JSON `info`)."""
    hooks = Path(state_dir) / HOOKS_DIR
    path = hooks / name
    if not path.exists():
        return None
    log.warning("migration.hook_waiting", hook=name, **{k: str(v) for k, v in info.items()})
    (hooks / f"{name}.reached").write_text(json.dumps(info, default=str))
    return path


def gate_sync(state_dir: Path, name: str, info: dict[str, Any]) -> None:
    """`gate` for code running in a worker thread."""
    path = _reach(state_dir, name, info)
    deadline = time.monotonic() + HOOK_MAX_WAIT
    while path is not None and path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


async def gate(state_dir: Path, name: str, clock: Clock, info: dict[str, Any]) -> None:
    path = _reach(state_dir, name, info)
    if path is None:
        return
    deadline = clock.monotonic() + HOOK_MAX_WAIT
    while path.exists() and clock.monotonic() < deadline:
        await asyncio.sleep(0.05)

"""Did Docker start a container from scratch behind Ferry's back? Then its state is lost.

A restore from a checkpoint starts the container too (StartedAt moves), but
only Docker's restart policy raises RestartCount. So: a higher RestartCount
means Docker restarted it fresh; a new StartedAt when nothing was restored
means someone started it fresh.
"""

from __future__ import annotations

from typing import Any

from agent.docker_adapter import DockerAdapter, DockerNotFound


def restart_count(inspect: dict[str, Any]) -> int:
    return int(inspect.get("RestartCount") or 0)


def started_at(inspect: dict[str, Any]) -> str:
    return str((inspect.get("State") or {}).get("StartedAt") or "")


def fresh_start(before: dict[str, Any], now: dict[str, Any], restored: bool) -> str | None:
    """Why `now` runs a process started from scratch since `before`, or None."""
    if not (now.get("State") or {}).get("Running"):
        return None
    was, count = restart_count(before), restart_count(now)
    if count > was:
        return f"Docker restarted it from scratch (restart policy; RestartCount {was} -> {count})"
    if not restored and started_at(now) != started_at(before):
        return (
            f"it was started from scratch at {started_at(now)} (not restored from its checkpoint)"
        )
    return None


def check_fresh_start(
    adapter: DockerAdapter, container_id: str, before: dict[str, Any], restored: bool
) -> str | None:
    """Blocking. `fresh_start` against the container as Docker sees it now."""
    try:
        now = adapter.inspect_container(container_id)
    except DockerNotFound:
        return None
    return fresh_start(before, now, restored)


def state_lost_sentence(name: str, detail: str) -> str:
    return f"STATE LOST: {name} did not keep its state: {detail}"

"""The Docker events source against a real dockerd on the testbed, across a dockerd restart.

What it shows: events arrive; the inventory follows create/rename/destroy;
when dockerd restarts the source reconnects and, through since=, also gets the
events that happened between the old stream ending and the new connection
(the reconnect is held back by a gate until those events have happened, so
this cannot pass by the source simply reconnecting fast).

The test only touches containers named ferry-sigtest-*, on the last host.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.docker_adapter import DockerAdapter
from agent.signals.docker_events import DockerEventsSource
from agent.signals.store import SignalStore
from tests.helpers import run_async
from tests.testbed import restart_dockerd

pytestmark = [pytest.mark.testbed]

IMAGE = "ferry-test/counter:1"
PREFIX = "ferry-sigtest-"


class GatedAdapter:
    """Passes through to the real adapter, but can hold `events()` (the reconnect) back."""

    def __init__(self, inner: DockerAdapter) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()
        self.waiting = threading.Event()
        self.since_calls: list[float | None] = []

    def events(self, since: float | None, until: float | None = None) -> Any:
        if not self.open.is_set():
            self.waiting.set()
            self.open.wait(120)
        self.since_calls.append(since)
        return self.inner.events(since, until)

    def list_containers(self) -> list[dict[str, Any]]:
        return self.inner.list_containers()

    def inspect_container(self, container: str) -> dict[str, Any]:
        return self.inner.inspect_container(container)


async def until(store: SignalStore, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        version = store.version
        if condition():
            return
        remaining = deadline - time.monotonic()
        assert remaining > 0, "condition not reached in time"
        await store.wait_changed(version, timeout=remaining)


def _mine(store: SignalStore) -> dict[str, str]:
    """id -> name of this test's containers in the store's inventory."""
    return {c.id: c.name for c in store.containers() if c.name.startswith(PREFIX)}


def _actions(store: SignalStore, cid: str) -> list[str]:
    return [e.action for e in store.events() if e.container_id == cid]


def test_events_inventory_and_resume_after_dockerd_restart(testbed_hosts: list[Any]) -> None:
    host = testbed_hosts[-1]
    adapter = GatedAdapter(DockerAdapter(host.docker_host, timeout=60))
    api = adapter.inner
    store = SignalStore(default_max_age=None)
    source = DockerEventsSource(adapter, backoff_initial=0.2, backoff_max=2.0)
    created: list[str] = []

    def create(name: str, **labels: str) -> str:
        cid = api.create_container({"Image": IMAGE, "Labels": labels}, name=PREFIX + name)
        created.append(cid)
        return cid

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: store.value("docker.connected") == 1.0)

            # Live: events arrive and the inventory follows create/rename/destroy.
            a = await asyncio.to_thread(create, "a", **{"ferry.migrate": "true"})
            await until(store, lambda: _mine(store).get(a) == PREFIX + "a")
            info = next(c for c in store.containers() if c.id == a)
            assert info.labels.get("ferry.migrate") == "true"
            assert info.image == IMAGE
            await asyncio.to_thread(api.rename, a, PREFIX + "a2")
            await until(store, lambda: _mine(store).get(a) == PREFIX + "a2")
            await asyncio.to_thread(api.remove, a, True)
            await until(store, lambda: a not in _mine(store))
            assert _actions(store, a) == ["create", "rename", "destroy"]
            last_before = max(e.ts for e in store.events())

            # Restart dockerd with the reconnect held back until after more has happened.
            adapter.open.clear()
            await asyncio.to_thread(restart_dockerd, host)
            assert await asyncio.to_thread(adapter.waiting.wait, 60), "source never reconnected"
            assert store.value("docker.connected") == 0.0
            gap = await asyncio.to_thread(create, "gap", tier="db")
            await asyncio.to_thread(api.rename, gap, PREFIX + "gap2")
            adapter.open.set()

            await until(store, lambda: _mine(store).get(gap) == PREFIX + "gap2")
            await until(store, lambda: _actions(store, gap) == ["create", "rename"])
            since = adapter.since_calls[-1]
            assert since is not None and last_before - 0.001 <= since <= last_before
            assert store.value("docker.connected") == 1.0

            # And live again on the new connection.
            b = await asyncio.to_thread(create, "b")
            await asyncio.to_thread(api.rename, b, PREFIX + "b2")
            await asyncio.to_thread(api.remove, b, True)
            await until(store, lambda: _actions(store, b) == ["create", "rename", "destroy"])
            assert b not in _mine(store)

            keys = [(e.ts, e.container_id, e.action) for e in store.events()]
            assert len(keys) == len(set(keys)), "an event was delivered twice"
        finally:
            adapter.open.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        run_async(main(), timeout=300)
    finally:
        for cid in created:
            with contextlib.suppress(Exception):
                api.remove(cid, force=True)
        api.close()

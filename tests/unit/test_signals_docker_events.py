"""Docker events source against a fake Engine adapter (the boundary is agent.docker_adapter)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.signals.docker_events import DockerEventsSource, parse_event
from agent.signals.store import SignalStore
from tests.helpers import run_async

_END = object()


class FakeStream:
    """Blocks like the SDK stream; `close()` from another thread wakes the reader."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def push(self, event: dict[str, Any]) -> None:
        self._q.put(event)

    def end(self) -> None:
        self._q.put(_END)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self.closed = True
        self._q.put(_END)


class EngineDown(ConnectionError):
    pass


class FakeEngine:
    """A daemon with an in-memory event buffer that a restart empties, like dockerd's."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.up = True
        self.buffer: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []  # every event ever emitted, across restarts
        self.containers: dict[str, dict[str, Any]] = {}
        self.streams: list[FakeStream] = []
        self.since_calls: list[float | None] = []
        self.failed_connects = 0
        self.refused_three = threading.Event()
        self._ns = time.time_ns()
        self._ids = itertools.count(1)
        self.inspected: list[str] = []

    # -- adapter API used by the source --

    def events(self, since: float | None, until: float | None = None) -> FakeStream:
        with self.lock:
            if not self.up:
                self.failed_connects += 1
                if self.failed_connects >= 3:
                    self.refused_three.set()
                raise EngineDown("connection refused")
            self.since_calls.append(since)
            stream = FakeStream()
            for ev in self.buffer:
                if since is None or ev["timeNano"] >= since * 1e9:
                    stream.push(ev)
            self.streams.append(stream)
            return stream

    def list_containers(self) -> list[dict[str, Any]]:
        with self.lock:
            if not self.up:
                raise EngineDown("connection refused")
            return [
                {
                    "Id": cid,
                    "Names": [f"/{c['name']}"],
                    "Image": "busybox",
                    "ImageID": "sha256:bb",
                    "Labels": dict(c["labels"]),
                    "State": c["state"],
                    "Created": 1_700_000_000,
                }
                for cid, c in self.containers.items()
            ]

    def inspect_container(self, container: str) -> dict[str, Any]:
        with self.lock:
            self.inspected.append(container)
            c = self.containers.get(container)
            if c is None:
                raise LookupError(f"no such container: {container}")
            return {
                "Id": container,
                "Name": f"/{c['name']}",
                "Image": "sha256:bb",
                "Created": "2024-05-01T10:00:00.123456789Z",
                "Config": {"Image": "busybox", "Labels": dict(c["labels"])},
                "State": {"Status": c["state"]},
                "HostConfig": {"Memory": c.get("memory", 0)},
            }

    # -- test controls --

    def _emit_locked(self, action: str, cid: str, **attrs: str) -> None:
        # Real wall-clock times, like dockerd's: the source asks since= a wall-clock time.
        self._ns = max(time.time_ns(), self._ns + 1_000)
        ev = {
            "Type": "container",
            "Action": action,
            "Actor": {"ID": cid, "Attributes": attrs},
            "time": self._ns // 1_000_000_000,
            "timeNano": self._ns,
        }
        self.buffer.append(ev)
        self.history.append(ev)
        for stream in self.streams:
            stream.push(ev)

    def create(self, name: str, **labels: str) -> str:
        with self.lock:
            cid = f"{next(self._ids):064x}"
            self.containers[cid] = {"name": name, "labels": labels, "state": "created"}
            self._emit_locked("create", cid, name=name, image="busybox", **labels)
            return cid

    def start(self, cid: str) -> None:
        with self.lock:
            self.containers[cid]["state"] = "running"
            self._emit_locked("start", cid, name=self.containers[cid]["name"])

    def update_memory(self, cid: str, limit: int) -> None:
        """`docker update --memory`: the limit changes and an `update` event follows."""
        with self.lock:
            self.containers[cid]["memory"] = limit
            self._emit_locked("update", cid, name=self.containers[cid]["name"])

    def die(self, cid: str) -> None:
        with self.lock:
            self.containers[cid]["state"] = "exited"
            self._emit_locked("die", cid, name=self.containers[cid]["name"], exitCode="137")

    def rename(self, cid: str, new: str) -> None:
        with self.lock:
            old = self.containers[cid]["name"]
            self.containers[cid]["name"] = new
            self._emit_locked("rename", cid, name=new, oldName=f"/{old}")

    def destroy(self, cid: str) -> None:
        with self.lock:
            name = self.containers.pop(cid)["name"]
            self._emit_locked("destroy", cid, name=name)

    def health(self, cid: str, status: str) -> None:
        with self.lock:
            self._emit_locked(f"health_status: {status}", cid, name=self.containers[cid]["name"])

    def end_streams_then(self, during_gap: Callable[[], None] = lambda: None) -> None:
        """Streams end silently, then `during_gap` runs.

        Called from the test's event loop thread, this returns before the
        source's coroutine can run again, so it cannot have reconnected yet.
        """
        with self.lock:
            for stream in self.streams:
                stream.end()
            self.streams.clear()
        during_gap()

    def stop_daemon(self) -> None:
        with self.lock:
            self.up = False
            for stream in self.streams:
                stream.end()  # the SDK stream ends without an error
            self.streams.clear()

    def start_daemon(self, first: Callable[[], None] = lambda: None) -> None:
        """Come back with an empty event buffer; `first` runs before anyone can connect."""
        with self.lock:  # re-entrant: `first` emits under the same hold
            self.up = True
            self.buffer = []
            first()


def actions(store: SignalStore) -> list[tuple[str, str]]:
    return [(e.action, e.container_id) for e in store.events()]


def history(engine: FakeEngine) -> list[tuple[str, str]]:
    return [(ev["Action"].partition(":")[0], ev["Actor"]["ID"]) for ev in engine.history]


async def until(store: SignalStore, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        version = store.version
        if condition():
            return
        remaining = deadline - time.monotonic()
        assert remaining > 0, "condition not reached in time"
        await store.wait_changed(version, timeout=remaining)


def names(store: SignalStore) -> list[str]:
    return [c.name for c in store.containers()]


def make(engine: FakeEngine) -> tuple[DockerEventsSource, SignalStore]:
    store = SignalStore(default_max_age=None)
    source = DockerEventsSource(engine, backoff_initial=0.01, backoff_max=0.05)
    return source, store


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_parse_event_folds_action_detail_and_ignores_other_types() -> None:
    raw = {
        "Type": "container",
        "Action": "health_status: unhealthy",
        "Actor": {"ID": "abc", "Attributes": {"name": "web", "ferry.migrate": "true"}},
        "time": 1_700_000_000,
        "timeNano": 1_700_000_000_123_456_789,
    }
    parsed = parse_event(raw)
    assert parsed is not None
    time_nano, event = parsed
    assert time_nano == 1_700_000_000_123_456_789
    assert event.action == "health_status"
    assert event.attributes["action_detail"] == "unhealthy"
    assert event.name == "web"
    assert event.ts == pytest.approx(1_700_000_000.123456789)
    assert parse_event({**raw, "Type": "network"}) is None


def test_inventory_follows_create_rename_destroy_and_state() -> None:
    engine = FakeEngine()
    existing = engine.create("db", role="database")
    engine.start(existing)
    source, store = make(engine)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: store.value("docker.connected") == 1.0)
            assert names(store) == ["db"]  # from the full list at connect
            assert store.containers()[0].labels == {"role": "database"}
            assert store.containers()[0].state == "running"

            cid = engine.create("web", **{"ferry.migrate": "true"})
            await until(store, lambda: "web" in names(store))
            web = next(c for c in store.containers() if c.name == "web")
            assert web.labels == {"ferry.migrate": "true"}
            assert web.image == "busybox" and web.image_id == "sha256:bb"
            assert web.created == pytest.approx(1714557600.123456)

            assert store.value("containers.running") == 1.0
            engine.start(cid)
            await until(store, lambda: _state(store, "web") == "running")
            assert store.value("containers.running") == 2.0
            engine.rename(cid, "web-old")
            await until(store, lambda: names(store) == ["db", "web-old"])
            engine.die(cid)
            await until(store, lambda: _state(store, "web-old") == "exited")
            engine.health(existing, "unhealthy")
            engine.destroy(cid)
            await until(store, lambda: names(store) == ["db"])

            assert actions(store) == history(engine)[2:]  # live events, in order
            assert store.event_count("die", 0) == 1
            assert store.event_count("health_status:unhealthy", 0) == 1
            destroy = store.events(action="destroy")[0]
            assert destroy.name == "web-old"
        finally:
            await cancel(task)

    run_async(main())
    assert source.connected is False


def _state(store: SignalStore, name: str) -> str | None:
    return next((c.state for c in store.containers() if c.name == name), None)


def test_silent_stream_end_reconnects_with_since_and_loses_nothing() -> None:
    engine = FakeEngine()
    source, store = make(engine)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: source.connects == 1)
            a = engine.create("a")
            engine.start(a)
            await until(store, lambda: len(store.events()) == 2)
            last_ns = engine.history[-1]["timeNano"]

            with capture_logs() as logs:
                # The stream ends silently, and before the source reconnects
                # more happens: only since= can bring those events back.
                def during_gap() -> None:
                    b = engine.create("b")
                    engine.rename(a, "a2")
                    engine.destroy(b)

                engine.end_streams_then(during_gap)
                await until(store, lambda: source.connects == 2)
                await until(store, lambda: len(store.events()) == 5)

            assert "signals.docker_events_ended" in [e["event"] for e in logs]
            since = engine.since_calls[-1]
            assert since is not None
            # From the last event seen (a microsecond earlier at most, for float rounding).
            assert last_ns - 2_000 <= since * 1e9 <= last_ns
            assert actions(store) == history(engine)  # nothing lost, nothing twice
            assert names(store) == ["a2"]
        finally:
            await cancel(task)

    run_async(main())


def test_survives_daemon_restart_and_catches_events_before_reconnect() -> None:
    engine = FakeEngine()
    source, store = make(engine)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: source.connects == 1)
            a = engine.create("a")
            await until(store, lambda: names(store) == ["a"])
            last_ns = engine.history[-1]["timeNano"]

            engine.stop_daemon()
            await until(store, lambda: store.value("docker.connected") == 0.0)
            # Let a few reconnects fail while dockerd is down.
            assert await asyncio.to_thread(engine.refused_three.wait, 5)

            created: list[str] = []

            def first() -> None:
                created.append(engine.create("early"))  # right after the daemon started
                engine.start(created[0])

            engine.start_daemon(first)
            await until(store, lambda: source.connects == 2)
            await until(store, lambda: len(store.events()) == 3)
            assert actions(store) == history(engine)
            assert names(store) == ["a", "early"]
            since = engine.since_calls[-1]
            assert since is not None and last_ns - 2_000 <= since * 1e9 <= last_ns

            engine.rename(a, "a-renamed")
            engine.destroy(a)
            await until(store, lambda: names(store) == ["early"])
            assert actions(store) == history(engine)
            assert store.value("docker.connected") == 1.0
        finally:
            await cancel(task)

    run_async(main())


def test_cancel_closes_stream_and_joins_reader_thread() -> None:
    engine = FakeEngine()
    source, store = make(engine)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        await until(store, lambda: source.connects == 1)
        assert any(t.name == "ferry-docker-events" for t in threading.enumerate())
        await cancel(task)

    run_async(main())
    assert all(s.closed for s in engine.streams)
    assert not any(t.name == "ferry-docker-events" for t in threading.enumerate())


def test_create_of_already_destroyed_container_uses_event_attributes() -> None:
    engine = FakeEngine()
    source, store = make(engine)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: source.connects == 1)
            with engine.lock:
                # The create event arrives but inspect already 404s.
                engine._emit_locked("create", "f" * 64, name="ghost", image="alpine", tier="x")
            await until(store, lambda: names(store) == ["ghost"])
            ghost = store.containers()[0]
            assert ghost.labels == {"tier": "x"} and ghost.image == "alpine"
            with engine.lock:
                engine._emit_locked("destroy", "f" * 64, name="ghost")
            await until(store, lambda: names(store) == [])
        finally:
            await cancel(task)

    run_async(main())


def test_memory_limit_is_read_once_per_container_and_again_on_update() -> None:
    engine = FakeEngine()
    big = engine.create("big")
    engine.containers[big]["memory"] = 512 << 20
    engine.start(big)
    unlimited = engine.create("unlimited")
    source, store = make(engine)

    def memory(name: str) -> int | None:
        return next((c.memory_bytes for c in store.containers() if c.name == name), None)

    async def main() -> None:
        task = asyncio.create_task(source.run(store))
        try:
            await until(store, lambda: store.value("docker.connected") == 1.0)
            assert (memory("big"), memory("unlimited")) == (512 << 20, 0)
            assert sorted(engine.inspected) == sorted([big, unlimited])  # once each, at connect

            small = engine.create("small")
            engine.containers[small]["memory"] = 64 << 20
            engine.start(small)
            await until(store, lambda: _state(store, "small") == "running")
            assert memory("small") == 64 << 20

            engine.update_memory(big, 1 << 30)
            await until(store, lambda: memory("big") == 1 << 30)

            inspected = len(engine.inspected)
            connects = source.connects
            engine.end_streams_then()
            await until(store, lambda: source.connects > connects)
            assert memory("big") == 1 << 30  # kept across the reconnect ...
            assert len(engine.inspected) == inspected  # ... without inspecting again
        finally:
            await cancel(task)

    run_async(main())

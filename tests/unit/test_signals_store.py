"""SignalStore: latest values with staleness, event history, inventory, change notification."""

from __future__ import annotations

import asyncio
import threading

from agent.model import ContainerInfo, DockerEvent, Sample
from agent.signals.store import SignalStore
from tests.helpers import FakeClock, run_async


def _event(action: str, ts: float, cid: str = "c1", **attrs: str) -> DockerEvent:
    return DockerEvent(action=action, container_id=cid, name="web", ts=ts, attributes=attrs)


def test_latest_value_and_names() -> None:
    store = SignalStore(FakeClock())
    assert store.value("load.1") is None
    store.publish(Sample("load.1", 0.5, 1.0))
    store.publish(Sample("load.1", 0.7, 2.0))
    store.publish(Sample("mem.available_ratio", 0.3, 2.0))
    assert store.value("load.1") == 0.7
    assert store.names() == ["load.1", "mem.available_ratio"]
    assert store.snapshot() == {"load.1": 0.7, "mem.available_ratio": 0.3}


def test_staleness_default_prefix_and_exact_rules() -> None:
    clock = FakeClock()
    store = SignalStore(clock, default_max_age=10.0)
    store.set_max_age("psi.", 30.0)
    store.set_max_age("psi.cpu.", None)  # longest prefix wins
    store.set_max_age("marker.drain", 5.0)
    for name in ("load.1", "psi.io.some.avg10", "psi.cpu.some.avg10", "marker.drain"):
        store.publish(Sample(name, 1.0, clock.time()))

    clock.advance(6)
    assert store.value("marker.drain") is None
    assert store.value("load.1") == 1.0
    clock.advance(5)  # 11 s
    assert store.value("load.1") is None
    assert store.value("psi.io.some.avg10") == 1.0
    clock.advance(20)  # 31 s
    assert store.value("psi.io.some.avg10") is None
    assert store.value("psi.cpu.some.avg10") == 1.0
    assert store.names() == ["psi.cpu.some.avg10"]

    store.publish(Sample("load.1", 2.0, clock.time()))
    assert store.value("load.1") == 2.0


def test_adopt_hints_from_sources() -> None:
    class Hinted:
        name = "x"

        async def run(self, sink: object) -> None:
            return None

        def max_ages(self) -> dict[str, float | None]:
            return {"x.": 2.0}

    clock = FakeClock()
    store = SignalStore(clock, default_max_age=None)
    store.adopt_hints([Hinted(), object()])
    store.publish(Sample("x.y", 1.0, 0.0))
    store.publish(Sample("other", 1.0, 0.0))
    clock.advance(3)
    assert store.value("x.y") is None
    assert store.value("other") == 1.0


def test_event_count_window_and_action_detail() -> None:
    clock = FakeClock(epoch=9_000.0)  # wall time 10_000
    store = SignalStore(clock, event_horizon=3600)
    store.publish_event(_event("die", 9_000.0))
    store.publish_event(_event("die", 9_500.0))
    store.publish_event(_event("oom", 9_600.0))
    store.publish_event(_event("health_status", 9_700.0, action_detail="unhealthy"))
    store.publish_event(_event("health_status", 9_800.0, action_detail="healthy"))

    assert store.event_count("die", 0) == 2
    assert store.event_count("die", 9_500.0) == 1  # at-or-after
    assert store.event_count("oom", 9_601.0) == 0
    assert store.event_count("health_status", 0) == 2
    assert store.event_count("health_status:unhealthy", 0) == 1
    assert store.event_count("health_status: healthy", 0) == 1
    assert [e.ts for e in store.events(since=9_600.0)] == [9_600.0, 9_700.0, 9_800.0]


def test_event_history_is_bounded_by_count_and_horizon() -> None:
    clock = FakeClock(epoch=9_000.0)  # wall time 10_000
    store = SignalStore(clock, max_events=3, event_horizon=100)
    for i in range(5):
        store.publish_event(_event("start", 9_950.0 + i))
    assert store.event_count("start", 0) == 3
    clock.advance(200)
    store.publish_event(_event("start", clock.time()))
    assert store.event_count("start", 0) == 1


def test_inventory_and_marker_content_and_reason() -> None:
    store = SignalStore(FakeClock())
    a = ContainerInfo("id-a", "a", "img", "sha256:1", {"ferry.migrate": "true"}, "running")
    b = ContainerInfo("id-b", "b", "img", "sha256:1", {}, "exited")
    store.set_containers([b, a])
    assert [c.name for c in store.containers()] == ["a", "b"]

    store.publish(Sample("marker.drain", 1.0, 0.0, {"content": "kernel upgrade"}))
    assert store.marker_content("drain") == "kernel upgrade"
    store.publish(Sample("marker.drain", 0.0, 0.0, {}))
    assert store.marker_content("drain") is None
    assert store.marker_content("never") is None

    store.publish(Sample("command.ntp", 1.0, 0.0, {"reason": "clock skew 3s"}))
    assert store.reason("command.ntp") == "clock skew 3s"


def test_wait_changed_wakes_on_change_from_another_thread() -> None:
    store = SignalStore(FakeClock())

    async def main() -> None:
        start = store.version
        waiter = asyncio.create_task(store.wait_changed(start))
        await asyncio.sleep(0)
        assert not waiter.done()
        t = threading.Thread(target=store.publish, args=(Sample("marker.drain", 1.0, 0.0),))
        t.start()
        t.join()
        version = await asyncio.wait_for(waiter, 5)
        assert version > start

    run_async(main())


def test_wait_changed_ignores_unchanged_republish_and_times_out() -> None:
    store = SignalStore(FakeClock())
    store.publish(Sample("load.1", 1.0, 0.0))
    seen: list[str] = []
    remove = store.add_listener(seen.append)

    async def main() -> None:
        v = store.version
        store.publish(Sample("load.1", 1.0, 1.0))  # same value: not a change
        assert store.version == v
        assert await store.wait_changed(v, timeout=0.05) == v
        store.publish(Sample("load.1", 2.0, 2.0))
        assert await store.wait_changed(v, timeout=5) == v + 1  # already past: returns at once

    run_async(main())
    assert seen == ["load.1"]
    remove()
    store.publish(Sample("load.1", 3.0, 3.0))
    assert seen == ["load.1"]


def test_stale_value_coming_back_counts_as_change() -> None:
    clock = FakeClock()
    store = SignalStore(clock, default_max_age=5.0)
    store.publish(Sample("load.1", 1.0, 0.0))
    v = store.version
    clock.advance(10)
    store.publish(Sample("load.1", 1.0, 10.0))
    assert store.version == v + 1


def test_failing_listener_does_not_break_publish() -> None:
    store = SignalStore(FakeClock())

    def boom(what: str) -> None:
        raise RuntimeError(what)

    store.add_listener(boom)
    store.publish(Sample("load.1", 1.0, 0.0))
    assert store.value("load.1") == 1.0

"""PeerHealthMonitor: answers become PeerHealth, failures and staleness make peers unreachable."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest

from agent.model import PeerHealth
from agent.peer.health import PeerHealthMonitor
from tests.helpers import run_async


class FakeClock:
    def __init__(self) -> None:
        self.mono = 100.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return 1_700_000_000.0 + self.mono


class ScriptedPeer:
    def __init__(self, name: str, *answers: dict[str, Any] | Exception) -> None:
        self.name = name
        self.answers = deque(answers)
        self.polls = 0

    async def health(self) -> dict[str, Any]:
        self.polls += 1
        answer = self.answers.popleft() if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class HangingPeer:
    name = "hang"

    async def health(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_answers_failures_and_staleness() -> None:
    clock = FakeClock()
    a = ScriptedPeer(
        "a",
        {"draining": False, "load1": 1.5, "mem_available_bytes": 2048, "tags": ["ssd"], "x": 1},
        ConnectionError("peer a: connection refused"),
        {"draining": True, "overloaded": True},
    )
    b = ScriptedPeer("b", {"draining": "yes"})
    mon = PeerHealthMonitor([a, b], interval=5, clock=clock, weights={"a": 2.0})
    assert [(p.name, p.reachable, p.error) for p in mon.peers()] == [
        ("a", False, "not polled yet"),
        ("b", False, "not polled yet"),
    ]

    async def go() -> None:
        await mon.poll_once()
        pa, pb = mon.peers()
        assert pa == PeerHealth(
            name="a",
            reachable=True,
            load1=1.5,
            mem_available_bytes=2048,
            tags=("ssd",),
            weight=2.0,
        )
        assert not pb.reachable and pb.error == "draining must be true or false, not 'yes'"

        await mon.poll_once()
        pa = mon.peers()[0]
        assert (pa.reachable, pa.error, pa.load1) == (False, "peer a: connection refused", 1.5)

        await mon.poll_once()
        pa = mon.peers()[0]
        assert (pa.reachable, pa.draining, pa.overloaded) == (True, True, True)

        clock.mono += 16  # > 3 intervals without a good answer
        pa = mon.peers()[0]
        assert (pa.reachable, pa.error) == (False, "no answer for 16s")

    run_async(go())


def test_hanging_peer_times_out_without_blocking_others() -> None:
    ok = ScriptedPeer("ok", {"load1": 0.1})
    mon = PeerHealthMonitor([HangingPeer(), ok], interval=5, timeout=0.05, clock=FakeClock())
    run_async(mon.poll_once())
    hang, good = mon.peers()
    assert (hang.reachable, hang.error) == (False, "timed out")
    assert good.reachable


def test_run_polls_every_interval_until_cancelled() -> None:
    peer = ScriptedPeer("p", {"load1": 0.1})
    sleeps: asyncio.Queue[float] = asyncio.Queue()
    resume = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.put_nowait(seconds)
        await resume.wait()
        resume.clear()

    mon = PeerHealthMonitor([peer], interval=7, clock=FakeClock(), sleep=fake_sleep)

    async def go() -> None:
        task = asyncio.create_task(mon.run())
        assert await sleeps.get() == 7
        assert peer.polls == 1
        resume.set()
        assert await sleeps.get() == 7
        assert peer.polls == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(go())
    assert mon.peers()[0].reachable

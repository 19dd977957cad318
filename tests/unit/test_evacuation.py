"""Evacuate/move actions against a fake migration engine and a fake peer directory."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from agent.migration.errors import MigrationFailed, MigrationRefused
from agent.model import ContainerInfo, Decision, PeerHealth
from agent.service.evacuation import EvacuateAction, Evacuator, MoveAction
from tests.helpers import FakeClock, run_async


@dataclass
class Report:
    container: str
    target: str
    downtime_s: float = 0.2


class FakeMigrator:
    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.running = 0
        self.max_running = 0
        self.calls: list[tuple[str, str]] = []
        self.failures: dict[str, list[Exception]] = {}
        self.started = asyncio.Event() if gate is not None else None
        self.two_running = asyncio.Event()

    async def migrate(self, container: str, target: str, progress: Any = None) -> Report:
        self.calls.append((container, target))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        if self.running >= 2:
            self.two_running.set()
        try:
            if progress is not None:
                progress("checkpoint")
            if self.gate is not None:
                assert self.started is not None
                self.started.set()
                await self.gate.wait()
            queue = self.failures.get(container)
            if queue:
                raise queue.pop(0)
            return Report(container, target)
        finally:
            self.running -= 1


class FakePeers:
    def __init__(self, *peers: PeerHealth) -> None:
        self.list = list(peers)

    def peers(self) -> list[PeerHealth]:
        return self.list


def ctr(name: str, mem: int = 0) -> ContainerInfo:
    return ContainerInfo(
        id=f"id-{name}",
        name=name,
        image="img",
        image_id="sha",
        labels={},
        state="running",
        memory_bytes=mem,
    )


def peer(name: str, **kw: Any) -> PeerHealth:
    return PeerHealth(name=name, reachable=kw.pop("reachable", True), **kw)


def decision(names: list[str], targets: list[str], **kw: Any) -> Decision:
    return Decision(
        policy=kw.pop("policy", "maintenance"),
        action=kw.pop("action", "evacuate"),
        containers=[ctr(n) for n in names],
        targets=targets,
        reason="marker.drain == 1",
        **kw,
    )


def test_parallelism_is_capped_and_containers_spread_over_peers() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        mig = FakeMigrator(gate)
        ev = Evacuator(mig, FakePeers(peer("b"), peer("c")), concurrency=2, host="a")
        names = [f"c{i}" for i in range(6)]
        task = asyncio.create_task(EvacuateAction(ev).execute(decision(names, [])))
        await mig.two_running.wait()
        status = ev.status()
        assert status["state"] == "in_progress"
        phases = [i.get("phase") for i in status["in_progress"] if i["state"] == "in_progress"]
        assert phases == ["checkpoint", "checkpoint"]
        assert len(status["in_progress"]) == 6  # two moving, four queued for a slot
        gate.set()
        result = await task
        assert result.ok, result
        assert mig.max_running == 2  # never a third at once
        assert Counter(t for _, t in mig.calls) == {"b": 3, "c": 3}
        assert all(v.startswith("moved to") for v in result.per_container.values())
        status = ev.status()
        assert status["state"] == "done"
        assert {d["container"] for d in status["done"]} == set(names)
        assert status["done"][0]["report"]["downtime_s"] == 0.2

    run_async(scenario())


def test_target_gone_bad_since_placement_is_replaced() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        peers = FakePeers(peer("b", draining=True), peer("c"), peer("d", overloaded=True))
        ev = Evacuator(mig, peers, concurrency=4, host="a")
        result = await MoveAction(ev).execute(decision(["x", "y"], ["b", "d"], action="move"))
        assert result.ok
        assert sorted(mig.calls) == [("x", "c"), ("y", "c")]

    run_async(scenario())


def test_never_targets_self_even_if_asked() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        ev = Evacuator(mig, FakePeers(peer("a"), peer("b")), host="a")
        assert (await EvacuateAction(ev).execute(decision(["x"], ["a"]))).ok
        assert mig.calls == [("x", "b")]

    run_async(scenario())


def test_stuck_containers_are_reported_with_reason_and_retried_with_backoff() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        mig = FakeMigrator()
        mig.failures["db"] = [
            MigrationRefused("target has no image and shipping is off"),
            MigrationFailed("restore failed: EPERM", rolled_back=True),
        ]
        ev = Evacuator(
            mig,
            FakePeers(peer("b")),
            concurrency=2,
            host="a",
            clock=clock,
            retry_base=30,
            retry_jitter=0,  # exact delays for the assertions below
            inventory=lambda: [ctr("db"), ctr("web")],
        )
        result = await EvacuateAction(ev).execute(decision(["db", "web"], ["b", "b"]))
        assert not result.ok
        assert result.per_container["web"] == "moved to b"
        assert "refused: target has no image" in result.per_container["db"]
        assert "stuck" in result.message or "retrying" in result.message

        status = ev.status()
        assert status["state"] == "stuck"
        [stuck] = status["stuck"]
        assert stuck["container"] == "db"
        assert stuck["reason"].startswith("refused: target has no image")
        assert stuck["retry_in_s"] == 30.0

        assert await ev.retry_due() == {}  # not due yet
        clock.now += 30
        out = await ev.retry_due()
        assert out["db"].startswith("stuck: failed, rolled back: restore failed")
        assert ev.status()["stuck"][0]["retry_in_s"] == 60.0  # doubled
        assert ev.status()["stuck"][0]["attempts"] == 2

        clock.now += 60
        assert await ev.retry_due() == {"db": "moved to b"}
        assert ev.status()["state"] == "done"
        assert [c for c, _ in mig.calls] == ["db", "web", "db", "db"]

    run_async(scenario())


def test_refusal_for_bad_input_is_not_retried() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        mig = FakeMigrator()
        mig.failures["ghost"] = [MigrationRefused("no container ghost", bad_input=True)]
        ev = Evacuator(mig, FakePeers(peer("b")), host="a", clock=clock)
        result = await EvacuateAction(ev).execute(decision(["ghost"], ["b"]))
        assert result.per_container["ghost"] == "stuck: refused: no container ghost"
        assert ev.status()["stuck"][0]["retry_in_s"] is None

    run_async(scenario())


def test_failure_without_rollback_is_not_retried() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        mig = FakeMigrator()
        mig.failures["db"] = [MigrationFailed("source gone", rolled_back=False)]
        ev = Evacuator(mig, FakePeers(peer("b")), host="a", clock=clock)
        result = await EvacuateAction(ev).execute(decision(["db"], ["b"]))
        assert "NOT rolled back" in result.per_container["db"]
        [stuck] = ev.status()["stuck"]
        assert stuck["retry_in_s"] is None
        clock.now += 10_000
        assert await ev.retry_due() == {}

    run_async(scenario())


def test_no_eligible_peer_says_why() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        peers = FakePeers(peer("b", draining=True), peer("c", reachable=False))
        ev = Evacuator(mig, peers, host="a")
        result = await EvacuateAction(ev).execute(decision(["x"], ["b"]))
        assert not result.ok
        assert result.per_container["x"] == "stuck: no eligible peer (b: draining, c: unreachable)"
        assert mig.calls == []
        assert ev.status()["stuck"][0]["reason"].startswith("no eligible peer")

    run_async(scenario())


def test_unplaced_from_policy_are_listed_as_stuck() -> None:
    async def scenario() -> None:
        ev = Evacuator(FakeMigrator(), FakePeers(peer("b")), host="a")
        d = decision(["x"], ["b"], details={"unplaced": ["big"]})
        result = await EvacuateAction(ev).execute(d)
        assert not result.ok
        assert result.per_container == {
            "x": "moved to b",
            "big": "stuck: no peer has room for it (placement)",
        }

    run_async(scenario())


def test_dry_run_moves_nothing() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        ev = Evacuator(mig, FakePeers(peer("b")), host="a")
        result = await EvacuateAction(ev).execute(decision(["x"], ["b"], dry_run=True))
        assert result.per_container == {"x": "dry run: would move to b"}
        assert mig.calls == []
        assert ev.status()["state"] == "idle"

    run_async(scenario())


def test_duplicate_request_for_in_flight_container_is_skipped() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        mig = FakeMigrator(gate)
        ev = Evacuator(mig, FakePeers(peer("b")), concurrency=2, host="a")
        first = asyncio.create_task(EvacuateAction(ev).execute(decision(["x"], ["b"])))
        assert mig.started is not None
        await mig.started.wait()
        second = await MoveAction(ev).execute(decision(["x"], ["b"], action="move"))
        assert second.per_container == {"x": "skipped: already in progress"}
        gate.set()
        assert (await first).ok
        assert len(mig.calls) == 1

    run_async(scenario())


def test_blocking_migrator_runs_in_a_thread() -> None:
    class SyncMigrator:
        def __init__(self) -> None:
            self.threads: list[str] = []

        def migrate(self, container: str, target: str, progress: Any = None) -> Report:
            self.threads.append(threading.current_thread().name)
            return Report(container, target)

    async def scenario() -> None:
        mig = SyncMigrator()
        ev = Evacuator(mig, FakePeers(peer("b")), host="a")
        assert (await EvacuateAction(ev).execute(decision(["x"], ["b"]))).ok
        assert mig.threads and mig.threads[0] != threading.main_thread().name

    run_async(scenario())


def test_retry_loop_retries_until_moved_and_drops_gone_containers() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        mig.failures["db"] = [MigrationRefused("busy"), MigrationRefused("busy")]
        mig.failures["tmp"] = [MigrationRefused("busy")]
        present = [ctr("db"), ctr("tmp")]
        ev = Evacuator(
            mig,
            FakePeers(peer("b")),
            host="a",
            retry_base=0.01,
            retry_max=0.02,
            inventory=lambda: present,
        )
        moved = asyncio.Event()
        ev.add_listener(lambda: moved.set() if ev.status()["state"] == "done" else None)
        loop = asyncio.create_task(ev.run_retries())
        try:
            await EvacuateAction(ev).execute(decision(["db", "tmp"], ["b", "b"]))
            present.remove(ctr("tmp"))  # removed by its owner: nothing left to move
            await asyncio.wait_for(moved.wait(), 10)
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
        assert [c for c, _ in mig.calls] == ["db", "tmp", "db", "db"]
        status = ev.status()
        assert status["stuck"] == [] and [d["container"] for d in status["done"]] == ["db"]

    run_async(scenario())


def test_cancel_drops_stuck_evacuation_items() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        mig.failures["db"] = [MigrationRefused("busy")]
        ev = Evacuator(mig, FakePeers(peer("b")), host="a")
        await EvacuateAction(ev).execute(decision(["db"], ["b"]))
        assert ev.cancel(kind="move") == []
        assert ev.cancel(kind="evacuate") == ["db"]
        assert ev.status()["state"] == "idle"

    run_async(scenario())


def test_a_group_moves_once_with_its_first_member() -> None:
    async def scenario() -> None:
        mig = FakeMigrator()
        ev = Evacuator(mig, FakePeers(peer("b"), peer("c")), concurrency=2, host="a")
        d = decision(["app", "cache", "lone"], ["b", "b", "c"])
        for c in d.containers[:2]:
            c.labels["com.docker.compose.project"] = "shop"
        result = await EvacuateAction(ev).execute(d)
        assert result.ok, result
        # The engine moves the whole group with its first member; nobody asks for the rest.
        assert sorted(mig.calls) == [("app", "b"), ("lone", "c")]
        assert result.per_container["cache"] == "moved to b (with its group, led by app)"
        assert {x["container"] for x in ev.status()["done"]} == {"app", "cache", "lone"}

    run_async(scenario())


class FakeCheck:
    """The eligibility check: per container, the peers that refuse it and why."""

    def __init__(self, peers: list[str]) -> None:
        self.peers = peers
        self.blockers: dict[str, list[str]] = {}
        self.refusing: dict[str, dict[str, str]] = {}
        self.calls: list[str] = []

    async def __call__(self, container: str, target: str | None) -> Any:
        from agent.migration.eligibility import Eligibility, PeerVerdict

        self.calls.append(container)
        refusing = self.refusing.get(container, {})
        verdict = Eligibility(container, f"id-{container}")
        verdict.blockers = list(self.blockers.get(container, []))
        if not verdict.blockers:
            verdict.peers = {
                p: PeerVerdict(p, [refusing[p]] if p in refusing else []) for p in self.peers
            }
        return verdict


def _with_movability(
    mig: FakeMigrator, peers: FakePeers, check: FakeCheck, inventory: list[ContainerInfo]
) -> tuple[Evacuator, Any]:
    from agent.service.movability import Movability

    clock = FakeClock()
    movability = Movability(check, lambda: inventory, peers, clock)
    ev = Evacuator(
        mig, peers, host="a", clock=clock, inventory=lambda: inventory, movability=movability
    )
    return ev, movability


def test_a_container_that_cannot_move_is_never_tried_nor_retried_until_it_changes() -> None:
    async def scenario() -> None:
        mig, peers = FakeMigrator(), FakePeers(peer("b"))
        check = FakeCheck(["b"])
        check.blockers["old"] = ["container old runs with --init: docker-init ..."]
        inventory = [ctr("old"), ctr("web")]
        ev, movability = _with_movability(mig, peers, check, inventory)
        result = await EvacuateAction(ev).execute(decision(["old", "web"], ["b", "b"]))
        assert result.per_container["old"].startswith("cannot move: container old runs with")
        assert result.per_container["web"] == "moved to b"
        assert mig.calls == [("web", "b")], "a known failure must never reach the freeze"
        assert "1 cannot move (not retried" in result.message
        (item,) = ev.status()["cannot_move"]
        assert item["container"] == "old" and item["retry_in_s"] is None
        assert ev.due() == [] and ev.status()["stuck"] == []
        # Left out of policy selection while nothing changes; asked again once it does.
        assert movability.known_unmovable() == {"id-old"}
        peers.list.append(peer("c"))
        assert movability.known_unmovable() == set()

    run_async(scenario())


def test_a_peer_that_refuses_is_replaced_by_one_that_accepts() -> None:
    async def scenario() -> None:
        mig, peers = FakeMigrator(), FakePeers(peer("b"), peer("c"))
        check = FakeCheck(["b", "c"])
        check.refusing["web"] = {"b": "10.0.0.5 is not an address of b"}
        ev, _ = _with_movability(mig, peers, check, [ctr("web")])
        result = await EvacuateAction(ev).execute(decision(["web"], ["b"]))
        assert result.per_container["web"] == "moved to c" and mig.calls == [("web", "c")]
        # Every peer refusing for a lasting reason: cannot move, with each peer's words.
        check.refusing["db"] = {"b": "port 80 in use", "c": "static address taken"}
        ev2, _ = _with_movability(FakeMigrator(), peers, check, [ctr("db")])
        out = await EvacuateAction(ev2).execute(decision(["db"], ["b"]))
        assert out.per_container["db"] == (
            "cannot move: b: port 80 in use; c: static address taken"
        )

    run_async(scenario())


def test_survey_lists_unmovable_and_stopped_opted_in_containers() -> None:
    async def scenario() -> None:
        check = FakeCheck(["b"])
        check.blockers["old"] = ["uses --link to db"]
        opted = {"ferry.migrate": "true"}
        inventory = [
            ContainerInfo("id-old", "old", "img", "sha", opted, "running"),
            ContainerInfo("id-off", "off", "img", "sha", opted, "exited"),
            ContainerInfo("id-ok", "ok", "img", "sha", opted, "running"),
            ContainerInfo("id-x", "x", "img", "sha", {}, "running"),
        ]
        _, movability = _with_movability(FakeMigrator(), FakePeers(peer("b")), check, inventory)
        survey = await movability.survey()
        assert sorted(survey, key=lambda u: str(u["container"])) == [
            {
                "container": "off",
                "state": "left_behind",
                "reason": "exited: only running containers move; it stays here",
            },
            {
                "container": "old",
                "state": "cannot_move",
                "reason": "uses --link to db",
                "permanent": True,
            },
        ]
        calls = list(check.calls)
        await movability.survey()
        assert check.calls == calls, "nothing changed: the answers are remembered"

    run_async(scenario())

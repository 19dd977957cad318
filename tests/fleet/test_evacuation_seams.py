"""The evacuator's fleet seams: the drain gate, and a target refused by the fleet."""

from __future__ import annotations

from typing import Any

from agent.fleet.migrator import TargetRefused
from agent.model import ContainerInfo, Decision, PeerHealth
from agent.service.evacuation import EvacuateAction, Evacuator
from tests.helpers import FakeClock, run_async


class Migrator:
    def __init__(self, refuse: dict[str, str]) -> None:
        self.refuse = refuse  # target -> why the fleet refuses it
        self.calls: list[tuple[str, str]] = []

    async def migrate(self, container: str, target: str, progress: Any = None) -> dict[str, Any]:
        self.calls.append((container, target))
        if target in self.refuse:
            raise TargetRefused(f"fleet reservation refused: {self.refuse[target]}")
        return {}


class Peers:
    def __init__(self, *peers: PeerHealth) -> None:
        self.list = list(peers)

    def peers(self) -> list[PeerHealth]:
        return self.list


def ctr(name: str) -> ContainerInfo:
    return ContainerInfo(
        id=name, name=name, image="i", image_id="s", labels={}, state="running", memory_bytes=1
    )


def evacuate(names: list[str], targets: list[str]) -> Decision:
    return Decision("maintenance", "evacuate", [ctr(n) for n in names], targets, "drain")


def test_a_refused_target_is_replaced_within_seconds_not_after_backoff() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        peers = Peers(PeerHealth("b", True), PeerHealth("c", True))
        mig = Migrator({"b": "b is draining or queued to drain"})
        ev = Evacuator(
            mig, peers, host="a", clock=clock, retry_base=30, inventory=lambda: [ctr("web")]
        )
        await EvacuateAction(ev).execute(evacuate(["web"], ["b"]))
        [stuck] = ev.status()["stuck"]
        assert stuck["reason"].startswith("waiting to be placed again (refused: fleet")
        assert stuck["retry_in_s"] <= 2.0
        # By the retry the fleet view says b is draining: placement picks c.
        peers.list[0] = PeerHealth("b", True, draining=True)
        clock.now += 2
        assert await ev.retry_due() == {"web": "moved to c"}
        assert mig.calls == [("web", "b"), ("web", "c")]

    run_async(scenario())


def test_the_gate_holds_evacuations_without_counting_attempts() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        turn: list[str | None] = ["waiting for a drain slot: queued behind h7"]
        mig = Migrator({})
        ev = Evacuator(
            mig,
            Peers(PeerHealth("b", True)),
            host="a",
            clock=clock,
            inventory=lambda: [ctr("web")],
            gate=lambda: turn[0],
        )
        await EvacuateAction(ev).execute(evacuate(["web"], ["b"]))
        [stuck] = ev.status()["stuck"]
        assert stuck["reason"] == "waiting for a drain slot: queued behind h7"
        assert stuck["attempts"] == 0 and mig.calls == []
        turn[0] = None
        clock.now += 2
        assert await ev.retry_due() == {"web": "moved to b"}

    run_async(scenario())

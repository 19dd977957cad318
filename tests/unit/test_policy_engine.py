"""The engine on a manual clock: hold, hysteresis, cooldown, caps, dry-run, actions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import InputError
from agent.model import ActionResult, ContainerInfo, Decision, PeerHealth
from agent.policy import ActionRegistry, EngineLimits, LogAction, PolicyEngine, Transition
from agent.policy.models import Policy
from agent.policy.sim import MemorySignals, StaticPeers
from tests.helpers import FakeClock, run_async

CPU = "psi.cpu.some.avg10"


class RecordingAction:
    """Counts calls; optionally blocks until released, or fails."""

    def __init__(self, name: str = "move", needs_target: bool = True) -> None:
        self.name = name
        self.needs_target = needs_target
        self.calls: list[tuple[float, Decision]] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.clock: FakeClock | None = None

    async def execute(self, decision: Decision) -> ActionResult:
        self.calls.append((self.clock.monotonic() if self.clock else 0.0, decision))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return ActionResult(ok=True, message="moved")


def container(
    name: str, priority: int | None = None, opt_in: bool = True, mem: int = 0
) -> ContainerInfo:
    labels = {"ferry.migrate": "true"} if opt_in else {}
    if priority is not None:
        labels["ferry.priority"] = str(priority)
    return ContainerInfo(
        id=f"id-{name}",
        name=name,
        image="img:1",
        image_id="",
        labels=labels,
        state="running",
        memory_bytes=mem,
    )


def policy(name: str = "cpu", **kw: Any) -> Policy:
    spec: dict[str, Any] = {
        "name": name,
        "when": {"signal": CPU, "op": ">", "value": 80},
        "action": "move",
        "cooldown": 0,
    }
    spec.update(kw)
    return Policy.model_validate(spec)


class Harness:
    def __init__(
        self,
        policies: list[Policy],
        actions: list[Any] | None = None,
        containers: list[ContainerInfo] | None = None,
        peers: list[PeerHealth] | None = None,
        dry_run: bool = False,
        limits: EngineLimits | None = None,
    ) -> None:
        self.clock = FakeClock(start=0.0)
        self.signals = MemorySignals()
        self.signals.inventory = (
            containers
            if containers is not None
            else [container("a", 1), container("b", 2), container("c", 3)]
        )
        self.peers = StaticPeers(peers if peers is not None else [PeerHealth("node-b", True)])
        self.actions = actions if actions is not None else [RecordingAction()]
        for action in self.actions:
            if isinstance(action, RecordingAction):
                action.clock = self.clock
        self.engine = PolicyEngine(
            policies,
            ActionRegistry([LogAction(), *self.actions]),
            self.signals,
            self.peers,
            self.clock,
            global_dry_run=dry_run,
            limits=limits,
            host="node-a",
        )
        self.transitions: list[Transition] = []

    @property
    def action(self) -> RecordingAction:
        return self.actions[0]  # type: ignore[no-any-return]

    async def tick(
        self, at: float, settle: bool = True, **signals: float | None
    ) -> list[Transition]:
        self.clock.set(at)
        for name, value in signals.items():
            self.signals.set(name.replace("_", "."), value)
        out = await self.engine.tick()
        if settle:
            await self.engine.wait_idle()
        else:
            await asyncio.sleep(0)  # a yield, not a wait: started actions run to their first await
        self.transitions.extend(out)
        return out

    async def run(
        self, values: dict[int, float], until: int, name: str = CPU, start: int = 0
    ) -> None:
        """Tick every second from `start` to `until`, setting `name` whenever `values` says."""
        for t in range(start, until + 1):
            if t in values:
                self.signals.set(name, values[t])
            await self.tick(t)

    def events(self, policy: str, event: str) -> list[Transition]:
        return [t for t in self.transitions if t.policy == policy and t.event == event]

    def status(self, name: str) -> str:
        return next(s.status for s in self.engine.states() if s.name == name)


def test_for_holds_before_firing_and_a_dip_resets_it() -> None:
    async def scenario() -> None:
        h = Harness([policy(**{"for": "30s"})])
        await h.run({0: 90, 20: 50, 21: 90}, until=50)
        pending = h.events("cpu", "pending")
        assert [t.at for t in pending] == [0, 21]
        assert [t.at for t in h.events("cpu", "cleared")] == [20]  # the dip reset the hold
        firing = h.events("cpu", "firing")
        assert [t.at for t in firing] == []  # 21 + 30 = 51 is not reached yet
        assert h.action.calls == []
        assert h.status("cpu") == "pending"
        await h.tick(51)
        assert [t.at for t in h.events("cpu", "firing")] == [51]
        assert len(h.action.calls) == 1

    run_async(scenario())


def test_hysteresis_prevents_flapping_on_an_oscillating_signal() -> None:
    async def scenario() -> None:
        flappy = policy("flappy", action="log", cooldown="1h")
        steady = policy(
            "steady",
            action="log",
            cooldown="1h",
            clear_when={"signal": CPU, "op": "<", "value": 60},
        )
        h = Harness([flappy, steady])
        # 79, 81, 79, 81, ... around the threshold of 80 for two minutes.
        await h.run({t: 81.0 if t % 2 else 79.0 for t in range(121)}, until=120)
        assert len(h.events("flappy", "firing")) == 60
        assert len(h.events("flappy", "cleared")) == 60
        assert len(h.events("steady", "firing")) == 1
        assert h.events("steady", "cleared") == []
        assert h.status("steady") in ("firing", "cooling_down")
        # Only once it drops below the clear threshold does it clear.
        await h.tick(121, **{"psi_cpu_some_avg10": 59})
        assert [t.at for t in h.events("steady", "cleared")] == [121]

    run_async(scenario())


def test_keep_firing_for_delays_clearing_and_blocks_new_actions() -> None:
    async def scenario() -> None:
        h = Harness([policy(keep_firing_for="10s", cooldown="2s", amount=1)])
        await h.run({0: 90, 5: 10, 8: 90, 9: 10}, until=30)
        # Cleared only after 10s of continuous clear condition (9 -> 19); the relapse at 8
        # re-armed it without a new `for` or `firing` event.
        assert [t.at for t in h.events("cpu", "firing")] == [0]
        assert [t.at for t in h.events("cpu", "cleared")] == [19]
        # Acted at 0, 2, 4 (cooldown 2s) and 8 (true again); nothing during the grace periods.
        assert [at for at, _ in h.action.calls] == [0, 2, 4, 8]

    run_async(scenario())


def test_cooldown_spaces_actions_and_counts_from_the_end_of_the_action() -> None:
    async def scenario() -> None:
        h = Harness([policy(cooldown="60s")], containers=[container(f"c{i}", i) for i in range(10)])
        await h.run({0: 90}, until=300)
        assert [at for at, _ in h.action.calls] == [0, 60, 120, 180, 240, 300]
        # The standing cooldown is logged once per period, not every second.
        assert len(h.events("cpu", "skipped")) == 5
        assert h.status("cpu") == "cooling_down"

        # A slow action: cooldown starts when it ends.
        slow = RecordingAction()
        h2 = Harness([policy(cooldown="60s")], actions=[slow])
        slow.gate = asyncio.Event()
        h2.signals.set(CPU, 90)
        await h2.tick(0, settle=False)
        for t in range(1, 100):
            await h2.tick(t, settle=False)
        slow.gate.set()
        await h2.engine.wait_idle()
        await h2.tick(100)  # the action finished at t=99
        assert [t.at for t in h2.events("cpu", "action_done")] == [99]
        for t in range(101, 161):
            await h2.tick(t)
        assert [at for at, _ in slow.calls] == [0, 159]

    run_async(scenario())


def test_policy_rate_limit() -> None:
    async def scenario() -> None:
        h = Harness(
            [policy(rate_limit={"max": 2, "per": "1h"})],
            containers=[container(f"c{i}", i) for i in range(10)],
        )
        await h.run({0: 90}, until=100)
        assert [at for at, _ in h.action.calls] == [0, 1]
        skipped = h.events("cpu", "skipped")
        assert [(t.at, t.skip_reason) for t in skipped] == [(2, "rate_cap")]
        await h.tick(3600)
        assert [at for at, _ in h.action.calls] == [0, 1, 3600]

    run_async(scenario())


def test_global_rate_cap_is_shared_and_trims_decisions() -> None:
    async def scenario() -> None:
        a, b = RecordingAction("move"), RecordingAction("evacuate")
        h = Harness(
            [policy("p1", amount=2), policy("p2", action="evacuate", amount=2)],
            actions=[a, b],
            containers=[container(f"c{i}", i) for i in range(10)],
            limits=EngineLimits(max_concurrent_migrations=5, max_migrations=3, window=600),
        )
        await h.run({0: 90}, until=599)
        moved = [c.name for _, d in a.calls + b.calls for c in d.containers]
        assert len(moved) == 3
        assert len(set(moved)) == 3
        assert [len(d.containers) for _, d in a.calls] == [2]
        assert [len(d.containers) for _, d in b.calls] == [1]  # trimmed to what was left
        assert [t.skip_reason for t in h.events("p1", "skipped")] == ["rate_cap"]
        await h.tick(600)  # the window has passed: budget again
        assert len(a.calls) == 2

    run_async(scenario())


def test_log_actions_do_not_use_the_migration_caps() -> None:
    async def scenario() -> None:
        h = Harness(
            [policy("logger", action="log")],
            limits=EngineLimits(max_concurrent_migrations=1, max_migrations=1, window=3600),
        )
        await h.run({0: 90}, until=5)
        assert len(h.events("logger", "acting")) == 6
        assert h.events("logger", "target_chosen") == []

    run_async(scenario())


def test_global_and_policy_concurrency_caps() -> None:
    async def scenario() -> None:
        a, b = RecordingAction("move"), RecordingAction("evacuate")
        a.gate = asyncio.Event()
        h = Harness(
            [policy("p1"), policy("p2", action="evacuate", amount=1)],
            actions=[a, b],
            limits=EngineLimits(max_concurrent_migrations=1),
        )
        h.signals.set(CPU, 90)
        await h.tick(0, settle=False)
        await h.tick(1, settle=False)
        assert len(a.calls) == 1 and b.calls == []
        assert [t.skip_reason for t in h.events("p1", "skipped")] == ["concurrency"]
        assert [t.skip_reason for t in h.events("p2", "skipped")] == ["concurrency"]
        assert h.engine.in_flight() == 1
        a.gate.set()
        await h.engine.wait_idle()
        await h.tick(2, settle=False)
        await h.engine.wait_idle()
        # The freed slot goes to p2, which has waited, not back to p1.
        assert len(a.calls) == 1 and len(b.calls) == 1

    run_async(scenario())


def test_containers_being_acted_on_are_not_selected_again() -> None:
    async def scenario() -> None:
        a = RecordingAction()
        a.gate = asyncio.Event()
        h = Harness(
            [policy(max_concurrent=3)],
            actions=[a],
            limits=EngineLimits(max_concurrent_migrations=3),
        )
        h.signals.set(CPU, 90)
        for t in range(5):
            await h.tick(t, settle=False)
        picked = [d.containers[0].name for _, d in a.calls]
        assert picked == ["a", "b", "c"]  # lowest priority first, each once
        assert [t.skip_reason for t in h.events("cpu", "skipped")] == ["concurrency"]
        a.gate.set()
        await h.engine.wait_idle()

    run_async(scenario())


@pytest.mark.parametrize("where", ["policy", "global"])
def test_dry_run_never_calls_the_action(where: str) -> None:
    async def scenario() -> None:
        p = policy(dry_run=where == "policy", cooldown="10s")
        h = Harness([p], dry_run=where == "global")
        await h.run({0: 90}, until=60)
        assert h.action.calls == []
        dry = [t for t in h.events("cpu", "skipped") if t.skip_reason == "dry_run"]
        assert [t.at for t in dry] == [0, 10, 20, 30, 40, 50, 60]  # cooldown is simulated
        assert all(t.containers == ("a",) and t.targets == ("node-b",) for t in dry)
        assert h.events("cpu", "acting") == []
        assert h.engine.in_flight() == 0

    run_async(scenario())


def test_skip_reasons_no_containers_and_no_target_are_logged_once() -> None:
    async def scenario() -> None:
        h = Harness(
            [policy()],
            containers=[container("x", opt_in=False)],
            peers=[
                PeerHealth("node-b", reachable=False),
                PeerHealth("node-c", True, draining=True),
            ],
        )
        await h.run({0: 90}, until=5)
        assert [t.skip_reason for t in h.events("cpu", "skipped")] == ["no_containers"]
        h.signals.inventory = [container("y")]
        await h.run({}, until=10, start=6)
        skipped = h.events("cpu", "skipped")
        assert [t.skip_reason for t in skipped] == ["no_containers", "no_target"]
        assert "node-b: unreachable" in skipped[1].reason
        assert "node-c: draining" in skipped[1].reason
        # The selection that could not be placed is reported alongside.
        assert [t.containers for t in h.events("cpu", "containers_selected")] == [("y",)]
        assert h.action.calls == []
        h.peers.current = [PeerHealth("node-c", True)]
        await h.tick(11)
        assert [d.targets for _, d in h.action.calls] == [["node-c"]]

    run_async(scenario())


def test_failed_and_raising_actions_are_reported() -> None:
    async def scenario() -> None:
        h = Harness([policy(cooldown="5s")])
        h.action.fail = RuntimeError("criu exploded")
        await h.run({0: 90}, until=1)
        (failed,) = h.events("cpu", "action_failed")
        assert failed.reason == "RuntimeError: criu exploded"
        assert failed.containers == ("a",)
        assert next(s for s in h.engine.states()).last_result == "RuntimeError: criu exploded"

    run_async(scenario())


def test_aclose_cancels_running_actions() -> None:
    async def scenario() -> None:
        h = Harness([policy(cooldown="1h")])
        h.action.gate = asyncio.Event()
        await h.tick(0, settle=False, psi_cpu_some_avg10=90)
        assert h.engine.in_flight() == 1
        await h.engine.aclose()
        assert h.engine.in_flight() == 0
        (done,) = [t for t in await h.tick(1) if t.event == "action_failed"]
        assert done.reason == "cancelled at shutdown"

    run_async(scenario())


def test_unknown_actions_are_refused_up_front() -> None:
    with pytest.raises(InputError, match=r"policies\[cpu\].action: no action named 'teleport'"):
        Harness([policy(action="teleport")])


def test_marker_and_event_conditions_drive_the_engine() -> None:
    async def scenario() -> None:
        drain = Policy.model_validate(
            {"name": "drain", "when": {"marker": "drain"}, "action": "evacuate", "cooldown": "1m"}
        )
        evac = RecordingAction("evacuate")
        h = Harness([drain], actions=[evac], peers=[PeerHealth("b", True), PeerHealth("c", True)])
        await h.tick(0, marker_drain=0)
        await h.tick(1, marker_drain=1)
        ((_, decision),) = evac.calls
        assert [c.name for c in decision.containers] == ["a", "b", "c"]  # evacuate = all
        assert decision.policy == "drain" and decision.action == "evacuate"
        assert len(decision.targets) == 3

    run_async(scenario())


def test_every_decision_is_one_structlog_event_with_its_reason() -> None:
    async def scenario() -> None:
        h = Harness([policy(**{"for": "2s"}, dry_run=True, cooldown="1h")])
        with capture_logs() as logs:
            await h.run({0: 90}, until=3)
        events = [(e["event"], e.get("skip_reason")) for e in logs]
        assert events == [
            ("policy.pending", None),
            ("policy.firing", None),
            ("policy.containers_selected", None),
            ("policy.target_chosen", None),
            ("policy.skipped", "dry_run"),
            ("policy.skipped", "cooldown"),  # once per cooldown, not every tick
        ]
        assert all(e["policy"] == "cpu" and e["reason"] for e in logs)

    run_async(scenario())


def test_states_snapshot() -> None:
    async def scenario() -> None:
        h = Harness([policy(**{"for": "10s"})])
        await h.tick(0, psi_cpu_some_avg10=90)
        (state,) = h.engine.states()
        assert state.name == "cpu" and state.status == "pending" and state.since == 0
        assert not state.active
        await h.tick(10)
        (state,) = h.engine.states()
        assert state.active and state.status == "firing" and state.since == 10  # cooldown 0
        assert "psi.cpu.some.avg10 > 80 for 10s" in state.summary

    run_async(scenario())

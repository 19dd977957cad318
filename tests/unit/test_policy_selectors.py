from __future__ import annotations

import itertools
from typing import Any

import pytest

from agent.model import ContainerInfo, PeerHealth
from agent.policy.models import Policy, Selector
from agent.policy.placement import place
from agent.policy.selectors import order, pick, select


def c(
    name: str,
    labels: dict[str, str] | None = None,
    image: str = "img:1",
    mem: int = 0,
    state: str = "running",
) -> ContainerInfo:
    return ContainerInfo(
        id=f"id-{name}",
        name=name,
        image=image,
        image_id="",
        labels=labels or {},
        state=state,
        memory_bytes=mem,
    )


OPT = {"ferry.migrate": "true"}


def sel(**kw: Any) -> Selector:
    return Selector.model_validate(kw)


def names(items: list[ContainerInfo]) -> list[str]:
    return [i.name for i in items]


INVENTORY = [
    c("web-1", {**OPT, "ferry.priority": "50", "tier": "web"}, "nginx:1.27", mem=200),
    c("web-2", {**OPT, "ferry.priority": "50", "tier": "web"}, "nginx:1.27", mem=300),
    c("batch", {**OPT, "ferry.priority": "10"}, "worker:3", mem=1000),
    c("db-main", {**OPT, "ferry.priority": "90", "tier": "db"}, "postgres:16", mem=4000),
    c("cache", {"ferry.migrate": "TRUE"}, "redis:7", mem=100),  # no priority label = 0
    c("sidecar", {}, "busybox"),  # not opted in
    c("stopped", {**OPT}, "busybox", state="exited"),
    c("opted-out", {"ferry.migrate": "false"}, "busybox"),
]


def test_only_running_opted_in_containers_are_selected_by_default() -> None:
    assert names(select(sel(), INVENTORY)) == ["web-1", "web-2", "batch", "db-main", "cache"]


def test_opt_in_can_be_waived_explicitly() -> None:
    assert "sidecar" in names(select(sel(require_opt_in=False), INVENTORY))
    assert "stopped" not in names(select(sel(require_opt_in=False), INVENTORY))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"labels": {"tier": "web"}}, ["web-1", "web-2"]),
        ({"has_labels": ["tier"]}, ["web-1", "web-2", "db-main"]),
        ({"name": "web-*"}, ["web-1", "web-2"]),
        ({"image": "postgres:*"}, ["db-main"]),
        ({"exclude": {"name": "db-*"}}, ["web-1", "web-2", "batch", "cache"]),
        ({"exclude": {"labels": {"tier": "web"}}}, ["batch", "db-main", "cache"]),
        ({"has_labels": ["tier"], "exclude": {"image": "nginx:*"}}, ["db-main"]),
        ({"labels": {"tier": "web"}, "name": "*-2"}, ["web-2"]),
    ],
)
def test_match_rules(rule: dict[str, Any], expected: list[str]) -> None:
    assert names(select(sel(**rule), INVENTORY)) == expected


def test_docker_style_leading_slash_names_match() -> None:
    assert names(select(sel(name="web"), [c("/web", OPT)])) == ["/web"]


def test_orders() -> None:
    chosen = select(sel(), INVENTORY)
    # Lowest ferry.priority first; unlabelled counts as 0; ties by name.
    assert names(order("priority", chosen)) == ["cache", "batch", "web-1", "web-2", "db-main"]
    assert names(order("memory_asc", chosen)) == ["cache", "web-1", "web-2", "batch", "db-main"]
    assert names(order("memory_desc", chosen)) == ["db-main", "batch", "web-2", "web-1", "cache"]


def policy(**kw: Any) -> Policy:
    return Policy.model_validate({"name": "p", "when": {"marker": "drain"}, **kw})


def test_pick_applies_amount_budget_and_busy() -> None:
    move = policy(action="move")
    evac = policy(action="evacuate")
    assert names(pick(move, INVENTORY)) == ["cache"]
    assert names(pick(policy(action="move", amount=2, order="memory_desc"), INVENTORY)) == [
        "db-main",
        "batch",
    ]
    assert len(pick(evac, INVENTORY)) == 5
    assert len(pick(evac, INVENTORY, budget=2)) == 2
    assert names(pick(move, INVENTORY, busy={"id-cache"})) == ["batch"]


# --- placement ---------------------------------------------------------------

BAD_PEERS = [
    PeerHealth("down", reachable=False, cpu_pressure=0),
    PeerHealth("draining", reachable=True, draining=True, cpu_pressure=0),
    PeerHealth("hot", reachable=True, overloaded=True, cpu_pressure=0),
    PeerHealth("node-a", reachable=True, cpu_pressure=0),  # this host
]


@pytest.mark.parametrize("strategy", ["least_loaded", "weighted", "spread"])
def test_placement_never_picks_unreachable_draining_overloaded_or_self(strategy: str) -> None:
    good = [PeerHealth("ok-1", True, cpu_pressure=90), PeerHealth("ok-2", True, cpu_pressure=95)]
    containers = [c(f"c{i}", OPT) for i in range(7)]
    for peers in itertools.permutations([*BAD_PEERS, *good]):
        result = place(strategy, containers, peers, "any", self_name="node-a")
        assert {t for _, t in result.assigned} <= {"ok-1", "ok-2"}
        assert len(result.assigned) == 7
    result = place(strategy, containers, BAD_PEERS, "any", self_name="node-a")
    assert result.assigned == [] and names(result.unplaced) == names(containers)
    assert result.rejected == {
        "down": "unreachable",
        "draining": "draining",
        "hot": "overloaded",
        "node-a": "self",
    }


def test_targets_list_restricts_peers() -> None:
    peers = [PeerHealth("b", True, cpu_pressure=50), PeerHealth("c", True, cpu_pressure=1)]
    result = place("least_loaded", [c("x")], peers, ["b"])
    assert result.assigned[0][1] == "b"
    assert result.rejected == {"c": "not in targets"}


def test_least_loaded_prefers_low_pressure_then_fewer_containers() -> None:
    peers = [
        PeerHealth("b", True, cpu_pressure=40, running_containers=1),
        PeerHealth("c", True, cpu_pressure=5, running_containers=9),
        PeerHealth("d", True, cpu_pressure=5, running_containers=2),
    ]
    assert [t for _, t in place("least_loaded", [c("x")], peers).assigned] == ["d"]


def test_weighted_shares_by_weight() -> None:
    peers = [PeerHealth("b", True, weight=2.0), PeerHealth("c", True, weight=1.0)]
    targets = [t for _, t in place("weighted", [c(f"x{i}") for i in range(9)], peers).assigned]
    assert targets.count("b") == 6 and targets.count("c") == 3


def test_spread_evens_out_container_counts() -> None:
    peers = [
        PeerHealth("b", True, running_containers=4),
        PeerHealth("c", True, running_containers=0),
        PeerHealth("d", True, running_containers=1),
    ]
    targets = [t for _, t in place("spread", [c(f"x{i}") for i in range(7)], peers).assigned]
    assert (targets.count("b"), targets.count("c"), targets.count("d")) == (
        0,
        4,
        3,
    )  # 4 each afterwards


def test_memory_must_fit_when_known() -> None:
    peers = [
        PeerHealth("small", True, cpu_pressure=0, mem_available_bytes=500),
        PeerHealth("big", True, cpu_pressure=50, mem_available_bytes=10_000),
        PeerHealth("unknown", True, cpu_pressure=99, mem_available_bytes=0),
    ]
    result = place(
        "least_loaded", [c("huge", mem=20_000), c("mid", mem=400), c("mid2", mem=400)], peers
    )
    assert result.assigned[0][1] == "unknown"  # only a peer that does not report memory
    assert [t for _, t in result.assigned[1:]] == ["small", "big"]  # small is full after one

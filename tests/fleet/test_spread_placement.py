"""ferry.spread in placement: replicas of one service never share a host."""

from __future__ import annotations

from agent.model import ContainerInfo, PeerHealth
from agent.policy.placement import place


def replica(name: str, key: str = "web") -> ContainerInfo:
    return ContainerInfo(
        id=name, name=name, image="i", image_id="s", labels={"ferry.spread": key}, state="running"
    )


def test_replicas_in_one_batch_go_to_different_hosts_and_the_rest_say_why() -> None:
    peers = [
        PeerHealth(name="a", reachable=True),
        PeerHealth(name="b", reachable=True, spread=("db",)),
        PeerHealth(name="c", reachable=True, spread=("web",)),
    ]
    result = place("spread", [replica("w1"), replica("w2"), replica("w3")], peers)
    targets = sorted(t for _, t in result.assigned)
    assert targets == ["a", "b"]
    assert [c.name for c in result.unplaced] == ["w3"]
    assert result.why == {"w3": "every eligible peer already has a replica of ferry.spread=web"}


def test_other_keys_and_unlabelled_containers_are_not_constrained() -> None:
    peers = [PeerHealth(name="a", reachable=True, spread=("web",))]
    plain = ContainerInfo(id="p", name="p", image="i", image_id="s", labels={}, state="running")
    result = place("spread", [replica("d1", "db"), plain], peers)
    assert [t for _, t in result.assigned] == ["a", "a"]


def test_static_peers_report_their_replicas_in_health() -> None:
    from agent.peer.health import health_from_answer
    from agent.service.peer_endpoint import local_health
    from agent.signals.store import SignalStore
    from tests.helpers import FakeClock

    store = SignalStore(FakeClock())
    stopped = replica("w0", "cache")
    stopped.state = "exited"
    store.set_containers([replica("w1"), replica("d1", "db"), stopped])
    doc = local_health("b", store, draining=False, overloaded=False)
    assert doc["spread"] == ["db", "web"]
    peer = health_from_answer("b", doc)
    assert peer.spread == ("db", "web")
    result = place("spread", [replica("w2")], [peer])
    assert result.unplaced and "already has a replica" in result.why["w2"]

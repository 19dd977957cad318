"""Agents of two releases: a peer older than the oldest protocol spoken here is refused
with a reason naming both numbers, and nothing is frozen, reserved or left behind.

Both hosts of the harness run this code, so "a newer agent" is this one with
PROTOCOL and OLDEST raised, and "an older agent" is a peer whose bodies and
answers carry no protocol number, as agents from before it did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.migration import MigrationRefused
from agent.model import PeerHealth
from agent.peer import protocol
from agent.peer.api import HandlerError
from agent.peer.health import health_from_answer
from agent.policy.placement import peer_rejection
from agent.service.prereqs import check_peers
from tests.helpers import run_async
from tests.unit.test_migration_engine import IMAGE_ID, DirectPeer, Host, stage_spec


@pytest.fixture
def newer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This agent speaks protocol 2 and no longer migrates with protocol 1."""
    monkeypatch.setattr(protocol, "PROTOCOL", 2)
    monkeypatch.setattr(protocol, "OLDEST", 2)
    yield


class OlderPeer(DirectPeer):
    """The target as an agent from before the protocol number: its answers carry none."""

    def __init__(self, *args: Any, strip_from: tuple[str, ...] = ("check", "prepare")) -> None:
        super().__init__(*args)
        self.strip_from = strip_from

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        answer = await super().post_json(path, body, timeout=timeout)
        parts = path.strip("/").split("/")
        call = "check" if parts[1] == "check" else "prepare" if len(parts) == 2 else parts[3]
        if call in self.strip_from:
            answer = {k: v for k, v in answer.items() if k != protocol.KEY}
        return answer


def test_the_number_is_read_from_bodies_and_answers() -> None:
    assert protocol.of({}) == 1  # agents from before the number
    assert protocol.of({"protocol": 3}) == 3
    for bad in ("2", 0, True, 1.5):
        with pytest.raises(ValueError, match="whole number"):
            protocol.of({"protocol": bad})
    assert protocol.refusal("b", "a", {"protocol": 1}) is None
    assert "b's protocol must be" in (protocol.refusal("b", "a", {"protocol": "x"}) or "")


def test_an_older_source_is_refused_at_prepare_and_check_with_nothing_reserved(
    newer: None, tmp_path: Any
) -> None:
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    handlers = b.service.handlers
    body = {"migration_id": "m-old", "container_id": "f" * 64, "name": "web", "image_id": IMAGE_ID}
    try:
        with pytest.raises(HandlerError) as refused:
            run_async(handlers.prepare("a", body))
        assert refused.value.error == "protocol"
        assert refused.value.reason == (
            "a speaks Ferry peer protocol 1, and b needs at least 2 (it speaks 2): "
            "upgrade the agent on a before moving containers between them"
        )
        assert handlers.incoming == {} and not handlers.reservations.active()
        assert b.journal.history() == []
        answer = run_async(handlers.check("a", body | {"spec": stage_spec()}))
        assert refused.value.reason in answer["reasons"]
        assert answer["protocol"] == 2
        # A source that says it speaks 2 is taken.
        assert run_async(handlers.prepare("a", body | {"protocol": 2}))["protocol"] == 2
    finally:
        run_async(handlers.close())
        b.journal.close()


@pytest.mark.parametrize("strip_from", [("check", "prepare"), ("prepare",)])
def test_a_newer_source_refuses_an_older_target_before_the_freeze(
    newer: None, tmp_path: Any, strip_from: tuple[str, ...]
) -> None:
    """Refused by the up-front check, or, if only prepare's answer shows it, by prepare:
    either way the container runs on untouched and the target keeps nothing."""
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    a.peers["b"] = OlderPeer("b", b.service.handlers, "a", strip_from=strip_from)
    cid = a.docker.add_running("web")
    try:
        with pytest.raises(MigrationRefused, match="upgrade the agent on b") as refused:
            run_async(a.service.migrate("web", "b"))
        assert "b speaks Ferry peer protocol 1, and a needs at least 2" in refused.value.reason
        c = a.docker.containers[cid]
        assert c["State"]["Running"] and c["HostConfig"]["RestartPolicy"]["Name"] == "always"
        assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)
        assert b.service.handlers.incoming == {}
        assert not b.service.handlers.reservations.active()
        assert all(r.outcome is not None for r in b.journal.history())
        assert b.docker.find_container("web") is None
    finally:
        run_async(b.service.handlers.close())
        a.journal.close()
        b.journal.close()


def test_placement_and_preflight_name_a_peer_too_old(newer: None) -> None:
    old = health_from_answer("b", {"load1": 0.1})  # an older agent's answer: no number
    assert old.protocol == 1
    assert peer_rejection(old, "any", "a") == ("speaks peer protocol 1, older than 2: upgrade it")
    assert peer_rejection(health_from_answer("c", {"protocol": 2}), "any", "a") == ""
    with pytest.raises(ValueError, match="protocol must be"):
        health_from_answer("d", {"protocol": "2"})

    async def probe() -> list[PeerHealth]:
        return [old, PeerHealth("c", reachable=True, protocol=2)]

    problems = run_async(check_peers(probe))
    assert [(p.check, p.fatal) for p in problems] == [("peer:b", False)]
    assert problems[0].message == (
        "speaks peer protocol 1, older than 2, so no container moves between them"
    )
    assert problems[0].fix == "upgrade the agent on b"


def test_a_peer_too_new_for_this_agent_is_skipped_with_the_host_to_upgrade() -> None:
    """This agent speaks 1; the peer speaks 3 and no longer migrates with 1 or 2."""
    new = health_from_answer("c", {"protocol": 3, "protocol_oldest": 3})
    assert peer_rejection(new, "any", "a") == (
        "needs peer protocol 3 or newer, this agent speaks 1: upgrade this host"
    )

    async def probe() -> list[PeerHealth]:
        return [new]

    problems = run_async(check_peers(probe))
    assert [p.fix for p in problems] == ["upgrade the agent on this host"]


def test_status_shows_a_peer_too_old(newer: None) -> None:
    from agent.cli.ops_cmds import _peer_health

    assert _peer_health({"reachable": True, "draining": True}) == (
        "[red]speaks peer protocol 1, older than 2: upgrade it[/]"
    )
    assert _peer_health({"reachable": True, "protocol": 2}) == "[green]ok[/]"
    assert _peer_health({"reachable": False, "protocol": 2}) == "[red]unreachable[/]"

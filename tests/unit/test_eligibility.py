"""The eligibility check with a fake Docker and fake peers at the boundary."""

from __future__ import annotations

import copy
import errno
from typing import Any

import pytest

from agent.config import FerryConfig
from agent.docker_adapter import DockerNotFound
from agent.migration import admission
from agent.migration.eligibility import Eligibility, EligibilityChecker, PeerVerdict
from agent.migration.errors import MigrationRefused
from agent.migration.fresh_start import fresh_start
from agent.peer.client import PeerRefused, PeerUnavailable
from tests.helpers import run_async
from tests.unit.test_migration_spec import INSPECT


class FakeDocker:
    def __init__(self, inspect: dict[str, Any], others: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        self.inspect = inspect
        self.others = list(others)
        self.networks: dict[str, dict[str, Any]] = {}

    def inspect_container(self, ref: str) -> dict[str, Any]:
        if ref not in (self.inspect["Id"], self.inspect["Name"].lstrip("/")):
            raise DockerNotFound("inspect", f"No such container: {ref}", 404)
        return self.inspect

    def list_containers(self) -> list[dict[str, Any]]:
        return self.others

    def memory_usage(self, ref: str) -> int:
        return 1 << 20

    def inspect_image(self, ref: str) -> dict[str, Any]:
        return {"Size": 5000}

    def inspect_network(self, name: str) -> dict[str, Any]:
        if name not in self.networks:
            raise DockerNotFound("inspect network", name, 404)
        return self.networks[name]


class FakePeer:
    def __init__(self, name: str, answer: Any) -> None:
        self.name = name
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        assert path == "/v1/check"
        self.bodies.append(body)
        if isinstance(self.answer, Exception):
            raise self.answer
        return dict(self.answer)


def _config(**migration: Any) -> FerryConfig:
    return FerryConfig.model_validate(
        {
            "name": "a",
            "peers": [{"name": "b", "address": "127.0.0.1:9"}],
            "migration": {"copy_named_volumes": True, **migration},
        }
    )


def _check(docker: FakeDocker, peers: dict[str, FakePeer], target: str | None = None) -> Any:
    checker = EligibilityChecker(docker, _config(), peers)  # type: ignore[arg-type]
    return run_async(checker.check("web", target))


OK = {"reasons": [], "transient": False, "has_image": True}


def test_movable_lists_what_changes_and_sends_the_target_what_prepare_checks() -> None:
    neighbour = {
        "Id": "n" * 64,
        "Names": ["/db"],
        "State": "running",
        "NetworkSettings": {"Networks": {"appnet": {}}},
    }
    peer = FakePeer("b", OK)
    verdict = _check(FakeDocker(INSPECT, [neighbour]), {"b": peer}, "b")
    assert verdict.movable and verdict.accepting() == ["b"]
    changes = verdict.changes
    assert any("172.18.0.5 on network appnet changes" in c for c in changes)
    assert any("leaves network appnet on this host: db stay here" in c for c in changes)
    assert any("published port 18080 (8080/tcp)" in c for c in changes)
    (body,) = peer.bodies
    assert body["ports"] == [{"host_ip": "", "host_port": 18080, "proto": "tcp"}]
    assert body["name"] == "web" and body["spec"]["name"] == "web" and body["addresses"] == {}


def test_source_reasons_are_permanent_and_the_targets_are_not_asked() -> None:
    bad = copy.deepcopy(INSPECT)
    bad["HostConfig"]["Init"] = True
    peer = FakePeer("b", OK)
    verdict = _check(FakeDocker(bad), {"b": peer})
    assert not verdict.movable and verdict.permanent
    assert "--init" in verdict.summary() and peer.bodies == []


def test_each_peer_answers_for_itself_and_an_unreachable_one_is_transient() -> None:
    peers = {
        "b": FakePeer("b", {"reasons": ["10.0.0.5 is not an address of b"], "has_image": True}),
        "c": FakePeer("c", PeerUnavailable("c", "connection refused")),
    }
    verdict = _check(FakeDocker(INSPECT), peers)
    assert not verdict.movable and not verdict.permanent  # c may come back
    assert verdict.reasons() == [
        "b: 10.0.0.5 is not an address of b",
        "c: unreachable: peer c: connection refused",
    ]
    peers["c"] = FakePeer("c", PeerRefused("c", 409, "refused", "a container named web exists"))
    verdict = _check(FakeDocker(INSPECT), peers)
    assert verdict.permanent  # until one of the peers changes


def test_image_the_target_lacks_is_a_change_or_a_reason_by_config() -> None:
    peer = FakePeer("b", {"reasons": [], "has_image": False})
    verdict = _check(FakeDocker(INSPECT), {"b": peer}, "b")
    assert verdict.movable and any("shipped to b first" in c for c in verdict.peers["b"].changes)
    checker = EligibilityChecker(
        FakeDocker(INSPECT),  # type: ignore[arg-type]
        _config(allow_image_shipping=False),
        {"b": peer},
    )
    refused = run_async(checker.check("web", "b"))
    assert "allow_image_shipping is off" in refused.summary()


def test_unknown_container_or_peer_is_bad_input() -> None:
    for container, target in (("ghost", None), ("web", "zz")):
        with pytest.raises(MigrationRefused) as err:
            _check_named(container, target)
        assert err.value.bad_input


def _check_named(container: str, target: str | None) -> Eligibility:
    checker = EligibilityChecker(FakeDocker(INSPECT), _config(), {"b": FakePeer("b", OK)})  # type: ignore[arg-type]
    return run_async(checker.check(container, target))


def test_already_migrating_is_said_alone_and_is_transient() -> None:
    checker = EligibilityChecker(
        FakeDocker(INSPECT),  # type: ignore[arg-type]
        _config(),
        {"b": FakePeer("b", OK)},
        active=lambda cid: "mig-1",
    )
    verdict = run_async(checker.check("web"))
    assert verdict.blockers == ["web is already being migrated (mig-1)"]
    assert not verdict.permanent


def test_ports_are_bound_for_real_by_the_target() -> None:
    calls: list[tuple[str, int, str]] = []

    def binder(ip: str, port: int, proto: str) -> int:
        calls.append((ip, port, proto))
        return {"10.0.0.5": errno.EADDRNOTAVAIL, "": errno.EADDRINUSE}.get(ip, 0)

    ports = [
        {"host_ip": "10.0.0.5", "host_port": 8081, "proto": "tcp"},
        {"host_ip": "", "host_port": 53, "proto": "udp"},
        {"host_ip": "", "host_port": 9000},
        {"host_ip": "127.0.0.1", "host_port": 7000},
    ]
    published = [("0.0.0.0", 9000)]
    out = admission.port_problems(ports, published, "b", binder)
    assert out == [
        "port 10.0.0.5:8081/tcp cannot be bound on b: 10.0.0.5 is not an address of b",
        "port 53/udp is in use on b by a process outside Docker",
        "port 9000 is already published on b",
    ]
    assert ("", 9000, "tcp") not in calls  # a Docker-published port is not tried twice


def test_real_bind_finds_a_missing_address() -> None:
    assert admission.try_bind("192.0.2.77", 0, "tcp") == errno.EADDRNOTAVAIL
    assert admission.try_bind("127.0.0.1", 0, "tcp") == 0


def test_static_addresses_must_fit_the_target_network() -> None:
    docker = FakeDocker(INSPECT)
    docker.networks["appnet"] = {
        "IPAM": {"Config": [{"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.1"}]},
        "Containers": {"x" * 64: {"Name": "db", "IPv4Address": "10.9.0.7/24"}},
    }
    check = admission.address_problems
    assert check({"appnet": {"IPv4Address": "10.9.0.8"}}, docker, "b") == []  # type: ignore[arg-type]
    assert check({"appnet": {"IPv4Address": "10.9.0.7"}}, docker, "b") == [  # type: ignore[arg-type]
        "static address 10.9.0.7 on network appnet is taken on b by db"
    ]
    assert check({"appnet": {"IPv4Address": "10.9.0.1"}}, docker, "b") == [  # type: ignore[arg-type]
        "static address 10.9.0.1 is the gateway of network appnet on b"
    ]
    (outside,) = check({"appnet": {"IPv4Address": "172.31.0.9"}}, docker, "b")  # type: ignore[arg-type]
    assert "outside network appnet on b (subnet 10.9.0.0/24)" in outside
    assert check({"other": {"IPv4Address": "1.2.3.4"}}, docker, "b") == []  # type: ignore[arg-type]


def test_peer_verdict_accepts_only_without_reasons() -> None:
    assert PeerVerdict("b").accepts and not PeerVerdict("b", ["no"]).accepts


def test_fresh_start_by_docker_or_by_someone_else() -> None:
    before = {"RestartCount": 0, "State": {"Running": True, "StartedAt": "t1"}}
    restarted = {"RestartCount": 1, "State": {"Running": True, "StartedAt": "t2"}}
    assert "RestartCount 0 -> 1" in str(fresh_start(before, restarted, restored=True))
    started = {"RestartCount": 0, "State": {"Running": True, "StartedAt": "t2"}}
    assert fresh_start(before, started, restored=True) is None  # a restore starts it too
    assert "started from scratch at t2" in str(fresh_start(before, started, restored=False))
    assert fresh_start(before, before, restored=False) is None


def test_group_members_are_not_neighbours_left_behind() -> None:
    from agent.migration.eligibility import neighbours_on_networks

    def ctr(name: str, **labels: str) -> dict[str, Any]:
        return {
            "Id": name * 8,
            "Names": [f"/{name}"],
            "State": "running",
            "Labels": labels,
            "NetworkSettings": {"Networks": {"appnet": {}}},
        }

    listed = [ctr("app"), ctr("redis", **{"com.docker.compose.project": "shop"}), ctr("other")]
    assert neighbours_on_networks(listed, "app" * 8, "shop") == {"appnet": ["other"]}
    assert neighbours_on_networks(listed, "app" * 8) == {"appnet": ["redis", "other"]}

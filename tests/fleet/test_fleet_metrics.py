"""The fleet's Prometheus gauges, from one agent's view."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest

from agent.fleet.etcd import KV, Etcd
from agent.fleet.fleet import Fleet
from agent.fleet.metrics import FleetCollector
from agent.fleet.view import Keys, decode
from tests.helpers import FakeClock


def kv(key: str, value: dict[str, object], rev: int) -> KV:
    return KV(key, json.dumps(value).encode(), rev, rev, 1)


def test_gauges_show_hosts_drain_queue_capacity_and_reservations() -> None:
    clock = FakeClock()
    etcd = Etcd(["127.0.0.1:1"], ca=None, cert=None, key=None, timeout=0.1)
    fleet = Fleet(
        etcd, name="a", address="a:1", prefix="/f/", lease_ttl=10, max_draining_hosts=1,
        clock=clock,
    )  # fmt: skip
    keys = Keys("/f/")
    fleet.view = decode(
        keys,
        9,
        [
            kv("/f/members/a", {"mem_available_bytes": 100, "running_containers": 3}, 1),
            kv("/f/members/b", {"mem_available_bytes": 200, "running_containers": 4}, 2),
            kv("/f/drain/b", {"reason": "kernel"}, 3),
            kv("/f/drain/a", {"reason": "kernel"}, 4),
            kv("/f/resv/a/m1", {"source": "b", "memory_bytes": 40, "disk_bytes": 50}, 5),
        ],
    )
    fleet._last_ok = clock.monotonic()
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    text = generate_latest(registry).decode()
    assert "ferry_fleet_view_fresh 1.0" in text
    assert 'ferry_fleet_hosts{state="up"} 2.0' in text
    assert 'ferry_fleet_hosts{state="draining"} 1.0' in text
    assert 'ferry_fleet_hosts{state="queued"} 1.0' in text
    assert 'ferry_fleet_host_memory_free_bytes{host="b"} 200.0' in text
    assert 'ferry_fleet_host_reserved_bytes{host="a",resource="memory"} 40.0' in text
    assert 'ferry_fleet_host_containers{host="a"} 3.0' in text
    fleet.reservations_made, fleet.reservation_conflicts = 5, 2
    text = generate_latest(registry).decode()
    assert "ferry_fleet_reservations_total 5.0" in text
    assert "ferry_fleet_reservation_conflicts_total 2.0" in text
    clock.now += 11  # no answer from etcd for longer than the lease: the view is stale
    assert "ferry_fleet_view_fresh 0.0" in generate_latest(registry).decode()

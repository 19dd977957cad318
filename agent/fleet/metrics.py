"""Prometheus gauges for the fleet, from this agent's own view of it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.fleet.fleet import Fleet


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        fleet = self._fleet
        fresh = fleet.fresh()
        up = GaugeMetricFamily(
            "ferry_fleet_view_fresh", "1 while this agent's view of the fleet is current"
        )
        up.add_metric([], 1.0 if fresh else 0.0)
        yield up
        view = fleet.view
        members = view.members if view is not None else {}
        hosts = GaugeMetricFamily(
            "ferry_fleet_hosts", "Hosts known to the fleet by state", labels=["state"]
        )
        queue = view.queue if view is not None else []
        holders = set(queue[: fleet.budget])
        hosts.add_metric(["up"], float(len(members)))
        hosts.add_metric(["down"], float(len(fleet.seen() - set(members))))
        hosts.add_metric(["draining"], float(len(holders)))
        hosts.add_metric(["queued"], float(len(queue) - len(holders)))
        yield hosts
        free = GaugeMetricFamily(
            "ferry_fleet_host_memory_free_bytes",
            "Free memory each host last reported, before reservations",
            labels=["host"],
        )
        containers = GaugeMetricFamily(
            "ferry_fleet_host_containers", "Running containers each host reported", labels=["host"]
        )
        reserved = GaugeMetricFamily(
            "ferry_fleet_host_reserved_bytes",
            "Capacity reserved on each host by migrations in flight",
            labels=["host", "resource"],
        )
        for name, member in sorted(members.items()):
            free.add_metric([name], float(member.num("mem_available_bytes")))
            containers.add_metric([name], float(member.num("running_containers")))
            mem, disk = view.reserved(name) if view is not None else (0, 0)
            reserved.add_metric([name, "memory"], float(mem))
            reserved.add_metric([name, "disk"], float(disk))
        yield free
        yield containers
        yield reserved
        requests = CounterMetricFamily(
            "ferry_fleet_etcd_requests", "Requests this agent sent to etcd"
        )
        requests.add_metric([], float(fleet.etcd.requests))
        yield requests
        made = CounterMetricFamily(
            "ferry_fleet_reservations",
            "Capacity reservations this agent made on targets (one etcd transaction each)",
        )
        made.add_metric([], float(fleet.reservations_made))
        yield made
        # Another agent reserved the same room first: many of these mean crowded targets.
        conflicts = CounterMetricFamily(
            "ferry_fleet_reservation_conflicts",
            "Reservation transactions lost to another agent's and retried",
        )
        conflicts.add_metric([], float(fleet.reservation_conflicts))
        yield conflicts

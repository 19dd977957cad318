"""Helpers for end-to-end tests that run real ferry agents on the testbed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker

from tests.helpers import wait_for
from tests.testbed import http_get_json
from tests.testbed.agents import agents_down, agents_up
from tests.testbed.layout import Host
from tests.testbed.procs import netns_argv

COUNTER = "ferry-test/counter:1"


@contextmanager
def running_agents(
    hosts: list[Host], policies: dict[str, dict[str, str]] | None = None
) -> Iterator[list[Host]]:
    """Agents on `hosts` for the duration of a test, with per-host policy files."""
    agents_up(hosts, policies)
    try:
        yield hosts
    finally:
        agents_down(hosts)


def ferry(host: Host, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ferry CLI on `host`, talking to that host's agent."""
    assert host.agent_config
    return subprocess.run(
        netns_argv(host, ["ferry", *args], {"FERRY_CONFIG": host.agent_config}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(host: Host) -> dict[str, Any]:
    proc = ferry(host, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def log_events(host: Host, name: str, policy: str | None = None) -> list[dict[str, Any]]:
    """The agent's JSON log events with this event name (and policy, when given).

    The log spans every agent started on the host in this run, so tests name
    their own policy to ignore what earlier tests' agents logged.
    """
    found = []
    for line in Path(host.agent_log).read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name and (policy is None or ev.get("policy") == policy):
            found.append(ev)
    return found


def run_counter(
    client: docker.DockerClient, name: str, port: int, opted_in: bool = True, **labels: str
) -> None:
    all_labels = {"ferry.migrate": "true"} if opted_in else {}
    all_labels.update(labels)
    client.containers.run(
        COUNTER, name=name, detach=True, ports={"8080/tcp": port}, labels=all_labels
    )


def counter_state(from_host: Host, at: Host, port: int, at_least: int = 0) -> dict[str, Any]:
    url = f"http://{at.ip}:{port}/"
    return wait_for(
        lambda: (s := http_get_json(from_host, url)) and s["counter"] >= at_least and s,
        timeout=60,
        what=f"counter on {at.name}:{port} to reach {at_least}",
    )


def where_running(clients: dict[str, docker.DockerClient], name: str) -> list[str]:
    """Hosts on which a container of this name is running."""
    return [
        host
        for host, c in clients.items()
        if c.containers.list(filters={"name": f"^{name}$", "status": "running"})
    ]

"""Agents and helpers for the migration end-to-end tests.

`engine_agents(hosts)` starts one real `ferry run` agent per testbed host and
checks that it serves `ferry migrate` before any test relies on it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker

from tests.e2e.agents_fixtures import counter_state
from tests.helpers import wait_for
from tests.testbed import agents as testbed_agents
from tests.testbed import procs
from tests.testbed.agents import REPO, _ensure_certs, write_config
from tests.testbed.layout import Host


def _serves_migrate(host: Host) -> bool:
    """Does the agent on `host` have the migration engine's control route?"""
    import aiohttp

    async def ask() -> bool:
        connector = aiohttp.UnixConnector(path=host.control_socket)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post("http://ferry/v1/migrate", json={}) as resp,
        ):
            return resp.status == 400  # the route exists and refused the empty body

    return asyncio.run(ask())


class Agents:
    """The real `ferry run` agents of a test module."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts

    def start(self, host: Host) -> None:
        testbed_agents.start_agent(host)

    def stop(self, host: Host, sig: int = signal.SIGTERM) -> None:
        testbed_agents.stop_agent(host, sig)

    def start_all(self) -> None:
        for h in self.hosts:
            self.start(h)
        assert _serves_migrate(self.hosts[0]), "ferry run does not serve /v1/migrate"

    def stop_all(self) -> None:
        for h in self.hosts:
            self.stop(h)


@contextmanager
def engine_agents(hosts: list[Host], **overrides: Any) -> Iterator[Agents]:
    _ensure_certs(hosts)
    for h in hosts:
        testbed_agents.stop_agent(h)  # one left by another module runs another config
        # A clean slate, as agents_up gives: a drain another module left must not leak in.
        (Path(h.state_dir) / "drain").unlink(missing_ok=True)
        write_config(h, hosts, policies={}, **overrides)
    agents = Agents(hosts)
    try:
        agents.start_all()
        yield agents
    finally:
        agents.stop_all()


def ferry_migrate(
    host: Host, container: str, target: str, timeout: float = 300
) -> tuple[int, list[dict[str, Any]], str]:
    """Run `ferry migrate --json` on `host`; (exit code, JSON lines, stderr)."""
    assert host.agent_config
    argv = [
        sys.executable, "-m", "agent", "migrate", container,
        "--to", target, "--config", host.agent_config, "--json",
    ]  # fmt: skip
    proc = subprocess.run(
        procs.netns_argv(host, argv), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    return proc.returncode, lines, proc.stderr


COUNTER = "ferry-test/counter:1"
MEMHOG = "ferry-test/memhog:1"
ONLY_ON_FIRST = "ferry-test/only-on-first:1"


def result_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    results = [x for x in lines if x.get("type") == "result"]
    assert results, f"no result line in {lines!r}"
    return results[-1]


def history(host: Host, migration_id: str | None = None) -> list[Any]:
    """The host's journal, read directly (WAL: safe beside the running agent)."""
    from agent.journal import Journal

    with Journal(Path(host.state_dir)) as journal:
        records = journal.history(200)
    return [r for r in records if migration_id is None or r.id == migration_id]


def container_or_none(client: Any, name: str) -> Any:
    import docker.errors

    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def hook_path(host: Host, name: str) -> Path:
    from agent.migration.hooks import HOOKS_DIR

    path = Path(host.state_dir) / HOOKS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Gate:
    """An engine hook (agent/migration/hooks.py): the migration waits here while armed."""

    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name
        self.path = hook_path(host, name)
        self.reached = self.path.with_name(f"{name}.reached")

    def arm(self) -> Gate:
        self.reached.unlink(missing_ok=True)
        self.path.write_text("test")
        return self

    def wait(self, timeout: float = 60.0) -> str:
        """Wait until a migration stops here; returns its id."""
        wait_for(
            self.reached.exists, timeout=timeout, what=f"{self.host.name} to reach {self.name}"
        )
        info = json.loads(self.reached.read_text())
        return str(info.get("migration") or info.get("migration_id"))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Gate:
        return self.arm()

    def __exit__(self, *exc: object) -> None:
        self.release()  # a failed test never leaves a migration parked here


def migrate_in_background(host: Host, container: str, target: str) -> subprocess.Popen[str]:
    assert host.agent_config
    argv = [
        sys.executable, "-m", "agent", "migrate", container,
        "--to", target, "--config", host.agent_config, "--json",
    ]  # fmt: skip
    return subprocess.Popen(
        procs.netns_argv(host, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


# Shared by the migration e2e modules (the runc module repeats the move and fault cases).
MOVE_PORT = 18080
FAULT_PORT = 18081
FAULT_NAME = "mig-fault"


def counter_on(host: Host, via: Host, after: dict[str, Any] | None = None) -> dict[str, Any]:
    """The moved counter's state at host:MOVE_PORT, asked from `via`'s network."""
    return counter_state(via, host, MOVE_PORT, at_least=after["counter"] + 2 if after else 5)


def check_moved(
    before: dict[str, Any], src: Host, dst: Host, clients: dict[str, docker.DockerClient]
) -> dict[str, Any]:
    # A client on the source's network reaches it at the target's address and port.
    after = counter_on(dst, via=src)
    assert after["nonce"] == before["nonce"], "a fresh process answered, not the restored one"
    assert after["counter"] >= before["counter"], "the in-memory counter went back"
    # One line per tick, in a file the process holds open in its writable layer.
    assert after["lines"] >= before["lines"]
    assert abs(after["lines"] - after["counter"]) <= 1, after
    later = counter_on(dst, via=src, after=after)
    assert later["lines"] > after["lines"], "the open file stopped growing"
    assert abs(later["lines"] - later["counter"]) <= 1, later
    assert container_or_none(clients[src.name], "mig-counter") is None, "source kept its copy"
    moved = clients[dst.name].containers.get("mig-counter")
    assert moved.status == "running"
    assert moved.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    return later


_READING = re.compile(r"iter=(\d+) mib=(\d+) checksum=([0-9a-f]+)")


def readings(container: Any) -> list[tuple[int, str]]:
    """(iteration, checksum) pairs the memhog printed so far."""
    text = container.logs().decode()
    return [(int(m[1]), m[3]) for m in _READING.finditer(text)]


def fault_state(host: Host, floor: int) -> dict[str, Any]:
    """The fault tests' counter on `host`, once it has reached `floor`."""
    return counter_state(host, host, FAULT_PORT, at_least=floor)


def runs_only_on(
    host: Host, before: dict[str, Any], clients: dict[str, docker.DockerClient]
) -> None:
    after = fault_state(host, before["counter"] + 2)
    assert after["nonce"] == before["nonce"], "not the original process"
    assert abs(after["lines"] - after["counter"]) <= 1, after
    running = [
        name
        for name, client in clients.items()
        if (c := container_or_none(client, FAULT_NAME)) is not None and c.status == "running"
    ]
    assert running == [host.name]
    # Restored with its policy back in place.
    c = clients[host.name].containers.get(FAULT_NAME)
    assert c.attrs["HostConfig"]["RestartPolicy"]["Name"] == "always"

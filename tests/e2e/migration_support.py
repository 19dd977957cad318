"""Agents and helpers for the migration end-to-end tests.

`engine_agents(hosts)` starts one real `ferry run` agent per testbed host. If
that runtime does not build the migration engine yet (no /v1/migrate route),
it runs the same runtime with this checkout's engine passed in through
`Overrides.migration` instead, so the tests exercise the engine either way.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.testbed import agents as testbed_agents
from tests.testbed import procs
from tests.testbed.agents import REPO, _agent_answers, _ensure_certs, write_config
from tests.testbed.layout import Host


def _launch_argv(config: str) -> list[str]:
    return [sys.executable, "-m", "tests.e2e.migration_support", config]


def start_engine_agent(host: Host, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    assert host.agent_config
    log = open(host.agent_log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        procs.netns_argv(host, _launch_argv(host.agent_config)),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    log.close()
    host.agent_pid = proc.pid

    def ready() -> bool:
        if proc.poll() is not None:
            tail = Path(host.agent_log).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{host.name}: agent exited ({proc.returncode}):\n{tail}")
        return _agent_answers(host)

    procs.wait_until(ready, timeout, f"{host.name} agent to answer", 0.2)
    return proc


def stop_engine_agent(host: Host, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    host.agent_pid = 0


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
    """The agents of a test module: real `ferry run` when it builds the engine, else the
    same runtime with the engine passed in through `Overrides.migration`."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.real = True
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, host: Host) -> None:
        if self.real:
            testbed_agents.start_agent(host)
        else:
            self.procs[host.name] = start_engine_agent(host)

    def stop(self, host: Host, sig: int = signal.SIGTERM) -> None:
        if self.real:
            testbed_agents.stop_agent(host, sig)
        elif host.name in self.procs:
            stop_engine_agent(host, self.procs.pop(host.name), sig)

    def start_all(self) -> None:
        for h in self.hosts:
            self.start(h)
        if self.real and not _serves_migrate(self.hosts[0]):
            # `ferry run` does not build the engine yet: run it with the engine passed in.
            self.stop_all()
            self.real = False
            for h in self.hosts:
                self.start(h)

    def stop_all(self) -> None:
        for h in self.hosts:
            self.stop(h)


@contextmanager
def engine_agents(hosts: list[Host], **overrides: Any) -> Iterator[Agents]:
    _ensure_certs(hosts)
    for h in hosts:
        testbed_agents.stop_agent(h)  # one left by another module runs another config
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


def _main(config_path: str) -> int:
    from agent.config import load_config
    from agent.journal import Journal
    from agent.logging import configure_logging
    from agent.migration.factory import runtime_parts
    from agent.service.runtime import Agent, Overrides, serve

    config = load_config(config_path)
    configure_logging(config.logging.level, config.logging.format)

    def parts(owner: Any) -> Any:
        return runtime_parts(owner, Journal(owner.config.state_dir))

    return asyncio.run(serve(Agent(config, Overrides(migration=parts))))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))


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

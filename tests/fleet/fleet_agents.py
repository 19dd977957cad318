"""Assembled agents (fake Docker and migration engine, real fleet code) on a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from agent.cli import main
from agent.config import load_config
from agent.journal import Journal
from agent.migration.report import MigrationReport
from agent.model import ContainerInfo, PeerHealth
from agent.peer.certs import ca_paths, init_ca, issue_host_cert
from agent.service.notify import Notifier
from agent.service.runtime import Agent, MigrationParts, Overrides
from agent.signals.markers import MarkerSource
from tests.etcd_cluster import EtcdCluster

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("h1", "h2", "h3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeDocker:
    def __init__(self, root: Path) -> None:
        self.root = root

    def info(self) -> dict[str, Any]:
        return {"ExperimentalBuild": True, "DockerRootDir": str(self.root)}

    def data_root(self) -> str:
        return str(self.root)

    def close(self) -> None:
        pass


class NoStaticPeers:
    def peers(self) -> list[PeerHealth]:
        return []


class World:
    """Where each container runs, and every move with what was draining at the time."""

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.containers: dict[str, list[ContainerInfo]] = {h: [] for h in HOSTS}
        self.moves: list[tuple[str, str, str, set[str]]] = []
        self.gate: asyncio.Event | None = None

    def publish(self) -> None:
        for host, agent in self.agents.items():
            if agent.store is not None:
                agent.store.set_containers(list(self.containers[host]))

    def draining_now(self) -> set[str]:
        return {h for h, a in self.agents.items() if a.draining()}


class FakeEngine:
    """Moves a container from one host's inventory to another's, like a migration."""

    def __init__(self, world: World, host: str) -> None:
        self.world = world
        self.host = host
        self.peers: dict[str, Any] = {}  # the engine's peer clients; the fleet adds to it

    async def migrate(self, container: str, target: str, progress: Any = None) -> MigrationReport:
        world = self.world
        world.moves.append((container, self.host, target, world.draining_now()))
        if world.gate is not None:
            await world.gate.wait()
        info = next(c for c in world.containers[self.host] if c.name == container)
        world.containers[self.host].remove(info)
        world.containers[target].append(info)
        world.publish()
        return MigrationReport("m", container, self.host, target, "succeeded", downtime_s=0.1)


@dataclass
class Fixture:
    world: World
    configs: dict[str, Path]


def container(name: str, mem: int = 64 << 20, **labels: str) -> ContainerInfo:
    return ContainerInfo(
        id=name,
        name=name,
        image="i",
        image_id="s",
        labels={"ferry.migrate": "true", **labels},
        state="running",
        memory_bytes=mem,
    )


@contextlib.contextmanager
def fleet_env(
    tmp_path: Path, etcd_cluster: EtcdCluster, prefix: str, budget: int = 1
) -> Iterator[Fixture]:
    """One config per host in HOSTS, each with only a `fleet:` section (no static peers)."""
    certs = tmp_path / "certs"
    init_ca(certs)
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(REPO / "policies" / "maintenance.yaml", policies)
    tls = etcd_cluster.tls
    configs = {}
    with tempfile.TemporaryDirectory(prefix="ffl") as short:
        for host in HOSTS:
            pair = issue_host_cert(certs, host, ips=("127.0.0.1",))
            state = tmp_path / host
            state.mkdir()
            port = free_port()
            cfg = {
                "name": host,
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(state),
                "policies_dir": str(policies),
                "control_socket": f"{short}/{host}/ferry.sock",
                "tls": {
                    "ca": str(ca_paths(certs).cert),
                    "cert": str(pair.cert),
                    "key": str(pair.key),
                },
                "limits": {"max_concurrent_migrations": 2},
                "fleet": {
                    "endpoints": etcd_cluster.endpoints,
                    "ca": str(tls.ca),
                    "cert": str(tls.cert),
                    "key": str(tls.key),
                    "prefix": prefix,
                    "lease_ttl": "3s",
                    "request_timeout": "1s",
                    "max_draining_hosts": budget,
                    "labels": {"rack": f"r{host[-1]}"},
                },
            }
            path = tmp_path / f"{host}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            configs[host] = path
        yield Fixture(World(), configs)


def make_agent(fx: Fixture, host: str) -> Agent:
    config = load_config(fx.configs[host], environ={})
    journal = Journal(config.state_dir)
    engine = FakeEngine(fx.world, host)

    def migration(agent: Agent) -> MigrationParts:
        return MigrationParts(engine, None, journal, close=journal.close)

    async def no_problems(agent: Agent) -> list[str]:
        return []

    return Agent(
        config,
        Overrides(
            docker=FakeDocker(config.state_dir),
            notifier=Notifier(None),
            sources=[MarkerSource({"drain": config.marker_paths()["drain"]}, rescan_interval=0.2)],
            peers=NoStaticPeers(),
            migration=migration,
            prereqs=no_problems,
            metrics_registry=CollectorRegistry(),
        ),
    )


def cli(*args: str) -> Any:
    """The CLI as an operator runs it (its own asyncio.run, so off the test's loop)."""
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


async def until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)

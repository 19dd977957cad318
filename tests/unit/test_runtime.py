"""The assembled agent against fakes: READY on a real NOTIFY_SOCKET, drain over the control
socket and the peer API, a policy firing an evacuation, configured plugins feeding a policy
and running its action, and a clean shutdown."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from agent.config import load_config
from agent.journal import Journal
from agent.migration.report import MigrationReport
from agent.model import ActionResult, ContainerInfo, Decision, PeerHealth, Sample, SignalSink
from agent.peer.certs import init_ca, issue_host_cert
from agent.peer.client import PeerClient, PeerRefused
from agent.peer.tls import client_context
from agent.policy.actions import ActionContext
from agent.service.control import ControlClient
from agent.service.notify import Notifier
from agent.service.runtime import (
    Agent,
    MigrationParts,
    Overrides,
    StartupRefused,
    serve,
)
from agent.signals.markers import MarkerSource
from agent.signals.registry import SourceContext
from tests.helpers import run_async

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeDocker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.closed = False

    def info(self) -> dict[str, Any]:
        return {"ExperimentalBuild": True, "DockerRootDir": str(self.root)}

    def version(self) -> dict[str, Any]:
        return {"Experimental": True}

    def data_root(self) -> str:
        return str(self.root)

    def close(self) -> None:
        self.closed = True


class FakePeers:
    def __init__(self) -> None:
        self.list = [PeerHealth(name="node-b", reachable=True)]

    def peers(self) -> list[PeerHealth]:
        return self.list


class FakeMigrator:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.moved = asyncio.Event()

    async def migrate(self, container: str, target: str, progress: Any = None) -> MigrationReport:
        self.calls.append((container, target))
        self.moved.set()
        return MigrationReport("m1", container, "a", target, "succeeded", downtime_s=0.25)


class FakeHandlers:
    async def health(self) -> dict[str, Any]:
        return {"running_containers": 7}

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": True, "from": peer}


@dataclass
class Env:
    config_path: Path
    notify: socket.socket
    notify_path: str
    certs: Path
    state: Path


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    certs = tmp_path / "certs"
    init_ca(certs)
    a = issue_host_cert(certs, "node-a")
    issue_host_cert(certs, "node-b")
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(REPO / "policies" / "maintenance.yaml", policies)
    with tempfile.TemporaryDirectory(prefix="frt") as short:
        cfg = {
            "name": "node-a",
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(tmp_path / "state"),
            "policies_dir": str(policies),
            "control_socket": f"{short}/run/ferry.sock",
            "peers": [{"name": "node-b", "address": f"127.0.0.1:{free_port()}"}],
            "tls": {"ca": str(certs / "ca.crt"), "cert": str(a.cert), "key": str(a.key)},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "limits": {"max_concurrent_migrations": 2},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        (tmp_path / "state").mkdir()
        notify_path = f"{short}/notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)
        sock.setblocking(False)
        try:
            yield Env(path, sock, notify_path, certs, tmp_path / "state")
        finally:
            sock.close()


async def next_notify(sock: socket.socket, want: str) -> list[str]:
    """Collect sd_notify datagrams until one contains `want`."""
    loop = asyncio.get_running_loop()
    seen = []
    while True:
        msg = (await loop.sock_recv(sock, 4096)).decode()
        seen.append(msg)
        if want in msg:
            return seen


def make_agent(env: Env, migrator: FakeMigrator) -> Agent:
    config = load_config(env.config_path)
    journal = Journal(env.state)

    def migration(agent: Agent) -> MigrationParts:
        return MigrationParts(migrator, FakeHandlers(), journal, close=journal.close)

    async def no_problems(agent: Agent) -> list[str]:
        return []

    marker = config.marker_paths()["drain"]
    return Agent(
        config,
        Overrides(
            docker=FakeDocker(env.state),
            notifier=Notifier(env.notify_path, watchdog_interval=0.05),
            sources=[MarkerSource({"drain": marker}, rescan_interval=0.5)],
            peers=FakePeers(),
            migration=migration,
            prereqs=no_problems,
        ),
    )


def test_agent_serves_drains_evacuates_and_stops_cleanly(env: Env) -> None:
    migrator = FakeMigrator()
    agent = make_agent(env, migrator)
    config = agent.config

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(agent, stop))
        try:
            seen = await asyncio.wait_for(next_notify(env.notify, "READY=1"), 20)
            assert any("STATUS=serving" in m for m in seen[-1:])
            await asyncio.wait_for(next_notify(env.notify, "WATCHDOG=1"), 10)

            client = ControlClient(config.control_socket)
            status = await client.status()
            assert status["host"] == "node-a" and status["draining"] is False
            assert [p["name"] for p in status["policies"]] == ["maintenance-drain"]
            assert status["policies"][0]["status"] == "ok"

            # The peer API over mTLS, as node-b sees it.
            ca = env.certs / "ca.crt"
            ctx = client_context(ca, env.certs / "node-b.crt", env.certs / "node-b.key")
            async with PeerClient("node-a", config.listen, ctx) as peer:
                health = await peer.health()
                assert health["draining"] is False and health["running_containers"] == 7
                assert (
                    await peer.post_json("/v1/migrations", {"migration_id": "m1", "name": "web"})
                )["accepted"] is True

                assert agent.store is not None
                agent.store.set_containers(
                    [
                        ContainerInfo(
                            id="c1",
                            name="web",
                            image="i",
                            image_id="s",
                            labels={"ferry.migrate": "true"},
                            state="running",
                        )
                    ]
                )
                result = await client.drain("kernel 6.9")
                assert result["draining"] is True
                await asyncio.wait_for(next_notify(env.notify, "STATUS=draining"), 10)
                assert (await peer.health())["draining"] is True
                with pytest.raises(PeerRefused) as refused:
                    await peer.post_json("/v1/migrations", {"migration_id": "m1", "name": "web"})
                assert refused.value.status == 503 and "draining" in str(refused.value)

                # The maintenance policy fires on the marker and evacuates "web" to node-b.
                await asyncio.wait_for(migrator.moved.wait(), 10)
                assert migrator.calls == [("web", "node-b")]
                status = await client.status()
                assert status["draining"] is True and status["drain_reason"] == "kernel 6.9"

                await client.undrain()
                assert (await peer.health())["draining"] is False
                assert (
                    await peer.post_json("/v1/migrations", {"migration_id": "m1", "name": "web"})
                )["accepted"] is True
        finally:
            stop.set()
            code = await asyncio.wait_for(serving, 30)
        assert code == 0
        assert await asyncio.wait_for(next_notify(env.notify, "STOPPING=1"), 5)
        assert not config.control_socket.exists()

    run_async(scenario(), timeout=60)
    assert agent.docker.closed


def test_fatal_prerequisites_refuse_to_start_and_leave_nothing_behind(env: Env) -> None:
    migrator = FakeMigrator()
    agent = make_agent(env, migrator)

    async def problems(agent: Agent) -> list[str]:
        return ["error: docker: not experimental; fix: set it"]

    agent._o.prereqs = problems

    async def scenario() -> None:
        with pytest.raises(StartupRefused) as err:
            await serve(agent)
        assert err.value.lines == ["error: docker: not experimental; fix: set it"]

    run_async(scenario())
    assert not agent.config.control_socket.exists()


def test_ferry_run_exits_3_with_one_line_per_problem(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "node-a",
                "state_dir": str(tmp_path / "state"),
                "policies_dir": str(policies),
                "control_socket": str(tmp_path / "ferry.sock"),
                "docker": {
                    "url": f"unix://{tmp_path}/no-docker.sock",
                    "criu_check": [str(tmp_path / "no-criu"), "--version"],
                },
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    checks = {ln.split(":")[1].strip() for ln in lines}
    assert {"docker", "criu", "tls"} <= checks, proc.stderr
    assert any("docker.url" in ln for ln in lines)


def test_ferry_run_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("limits: {max_concurrent_migrations: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "limits.max_concurrent_migrations" in proc.stderr


def test_real_migration_engine_is_wired_with_metered_control_route(env: Env) -> None:
    import aiohttp
    from prometheus_client import CollectorRegistry

    agent = make_agent(env, FakeMigrator())
    agent._o.migration = None  # the real engine, on the fake Docker adapter
    registry = CollectorRegistry()
    agent._o.metrics_registry = registry

    async def scenario() -> list[dict[str, Any]]:
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(agent, stop))
        try:
            await asyncio.wait_for(next_notify(env.notify, "READY=1"), 20)
            connector = aiohttp.UnixConnector(path=str(agent.config.control_socket))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(
                    "http://ferry/v1/migrate", json={"container": "web", "target": "nope"}
                ) as resp,
            ):
                lines = [json.loads(ln) for ln in (await resp.text()).splitlines()]
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 30) == 0
        return lines

    lines = run_async(scenario(), timeout=60)
    assert lines[-1]["type"] == "result" and lines[-1]["ok"] is False
    assert lines[-1]["kind"] == "refused" and lines[-1]["bad_input"] is True
    assert registry.get_sample_value("ferry_migrations_started_total") == 1
    assert registry.get_sample_value("ferry_migrations_failed_total") == 1


def test_second_agent_on_the_same_socket_refuses_and_first_keeps_serving(env: Env) -> None:
    from agent.service.control import AlreadyServing

    first = make_agent(env, FakeMigrator())
    second = make_agent(env, FakeMigrator())

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(first, stop))
        try:
            await asyncio.wait_for(next_notify(env.notify, "READY=1"), 20)
            with pytest.raises(AlreadyServing):
                await serve(second)
            assert second.migration is None  # stopped before the journal or Docker
            status = await ControlClient(first.config.control_socket).status()
            assert status["host"] == "node-a"
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 30) == 0

    run_async(scenario(), timeout=60)


# -- plugins, loaded the way `ferry run` loads them ----------------------------------


class SwitchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    initial: float


class SwitchSource:
    """A plugin source whose value the test flips."""

    Params = SwitchParams

    def __init__(self, ctx: SourceContext, params: SwitchParams) -> None:
        self.name = f"switch.{ctx.name}"
        self.signal = f"switch.{ctx.name}.up"
        self.value = params.initial
        self.changed = asyncio.Event()

    def publishes(self) -> list[str]:
        return [self.signal]

    async def run(self, sink: SignalSink) -> None:
        while True:
            sink.publish(Sample(self.signal, self.value, time.time()))
            self.changed.clear()
            await self.changed.wait()


class RecordParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str


class EvacuateAndRecord:
    """A plugin action that evacuates through the agent's hooks, then records the result."""

    Params = RecordParams
    needs_target = True
    results: ClassVar[list[tuple[str, str, ActionResult]]] = []
    done: ClassVar[asyncio.Event | None] = None

    def __init__(self, ctx: ActionContext, params: RecordParams) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.tag = params.tag

    async def execute(self, decision: Decision) -> ActionResult:
        result = await self.ctx.migrations.evacuate(decision)
        self.results.append((self.tag, self.ctx.host, result))
        assert self.done is not None
        self.done.set()
        return result


def test_configured_plugins_feed_policies_and_run_actions(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = __name__
    eps = {
        "ferry.signals": [
            importlib.metadata.EntryPoint("switch", f"{here}:SwitchSource", "ferry.signals")
        ],
        "ferry.actions": [
            importlib.metadata.EntryPoint("record", f"{here}:EvacuateAndRecord", "ferry.actions")
        ],
    }
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: eps.get(group, []))
    cfg = yaml.safe_load(env.config_path.read_text())
    cfg["signals"] = {"plugins": [{"type": "switch", "name": "web", "initial": 1}]}
    cfg["actions"] = {"plugins": [{"type": "record", "name": "evac-record", "tag": "t1"}]}
    env.config_path.write_text(yaml.safe_dump(cfg))
    policies = Path(cfg["policies_dir"])
    (policies / "web.yaml").write_text(
        "policies:\n"
        "  - name: web-down\n"
        "    when: {signal: switch.web.up, op: '<', value: 1}\n"
        "    amount: all\n"
        "    action: evac-record\n"
    )
    EvacuateAndRecord.results.clear()
    migrator = FakeMigrator()
    agent = make_agent(env, migrator)

    async def scenario() -> None:
        EvacuateAndRecord.done = asyncio.Event()
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(agent, stop))
        try:
            await asyncio.wait_for(next_notify(env.notify, "READY=1"), 20)
            assert agent.store is not None
            [guarded] = agent.plugins.sources
            source = guarded.source
            assert isinstance(source, SwitchSource)
            while agent.store.value("switch.web.up") != 1.0:
                await asyncio.wait_for(agent.store.wait_changed(), 5)
            agent.store.set_containers(
                [ContainerInfo("c1", "web", "i", "s", {"ferry.migrate": "true"}, "running")]
            )
            assert not migrator.calls  # the signal is up: nothing fires
            source.value = 0.0
            source.changed.set()
            await asyncio.wait_for(EvacuateAndRecord.done.wait(), 10)
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 30) == 0

    run_async(scenario(), timeout=60)
    assert migrator.calls == [("web", "node-b")]
    [(tag, host, result)] = EvacuateAndRecord.results
    assert (tag, host, result.ok) == ("t1", "node-a", True), result
    assert result.per_container["web"].startswith("moved"), result

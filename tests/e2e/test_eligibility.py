"""Eligibility before any freeze, truthful outcomes, and a drain that converges (issue 9).

Real agents on three testbed hosts. Every refusal is checked to have frozen
nothing: the container's StartedAt and RestartCount are unchanged and Docker
reports no checkpoint, pause or die event for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.agents_fixtures import ferry, log_events, status
from tests.e2e.migration_support import (
    COUNTER,
    Agents,
    Gate,
    container_or_none,
    engine_agents,
    ferry_migrate,
    history,
    migrate_in_background,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed import http_get_json, netns_run
from tests.testbed.agents import write_config
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

OPT_IN = {"ferry.migrate": "true"}
FROZEN_EVENTS = {"checkpoint", "pause", "die", "kill", "stop", "restart", "oom"}


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    if len(testbed_hosts) < 3:
        pytest.fail("these tests need 3 testbed hosts: `python -m tests.testbed up --hosts 3`")
    hosts = testbed_hosts[:3]
    with engine_agents(hosts) as agents:
        yield hosts, agents


@pytest.fixture
def clean(docker_clients: dict[str, docker.DockerClient]) -> Iterator[None]:
    yield
    for client in docker_clients.values():
        for c in client.containers.list(all=True):
            c.remove(force=True)
        for net in client.networks.list(names=["elig-net"]):
            net.remove()


def untouched(client: docker.DockerClient, name: str, since: float) -> dict[str, Any]:
    """Assert the container never froze: same start, no restart, no freeze events."""
    c = client.containers.get(name)
    state = c.attrs["State"]
    assert state["Running"] and not state["Paused"], state
    assert c.attrs["RestartCount"] == 0
    events = client.events(
        since=since, until=time.time() + 0.5, filters={"container": c.id}, decode=True
    )
    seen = {e.get("Action", "").split(":")[0] for e in events}
    assert not seen & FROZEN_EVENTS, f"{name} was touched: {sorted(seen)}"
    return c.attrs


def _check(host: Host, name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = ferry(host, "check", name, "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _restart_with(
    agents: Agents,
    host: Host,
    hosts: list[Host],
    policies: dict[str, str] | None = None,
    **overrides: Any,
) -> None:
    """Restart `host`'s agent with another config (no policies and defaults unless given)."""
    agents.stop(host)
    write_config(host, hosts, policies=policies or {}, **overrides)
    agents.start(host)


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _extra_address(host: Host) -> str:
    """An address in the testbed subnet that only `host` gets."""
    return host.ip.rsplit(".", 1)[0] + ".111"


def test_up_front_refusals_freeze_nothing(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient], clean: None
) -> None:
    (h1, h2, _), _ = cluster
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    extra = _extra_address(h1)
    netns_run(h1, ["ip", "addr", "add", f"{extra}/32", "dev", "eth0"])
    try:
        since = time.time()
        c1.networks.create("elig-net", ipam=_ipam("172.31.50.0/24"))
        c2.networks.create("elig-net", ipam=_ipam("172.31.60.0/24"))
        c1.containers.run(COUNTER, name="e-init", detach=True, init=True, labels=OPT_IN)
        c1.containers.run(COUNTER, name="e-hostip", detach=True, ports={"8080/tcp": (extra, 18181)})
        c1.containers.run(COUNTER, name="e-peer", detach=True)
        c1.containers.run(COUNTER, name="e-link", detach=True, links={"e-peer": "db"})
        _run_on(c1, "e-static", "elig-net", ipv4_address="172.31.50.10")
        cases = {
            "e-init": "--init: docker-init as PID 1 does not restore here",
            "e-hostip": f"{extra} is not an address of {h2.name}",
            "e-link": "--link to e-peer",
            "e-static": f"static address 172.31.50.10 is outside network elig-net on {h2.name}",
        }
        # The JSON answer once (the words are the same), the human output for each.
        code, answer = _check(h1, "e-static", "--to", h2.name)
        verdict = answer["eligibility"]
        assert code == 1 and not verdict["movable"] and verdict["permanent"], answer
        assert not verdict["peers"][h2.name]["accepts"]
        assert any(cases["e-static"] in r for r in verdict["reasons"]), verdict["reasons"]
        for name, words in cases.items():
            human = ferry(h1, "check", name, "--to", h2.name)
            assert human.returncode == 1, human.stdout + human.stderr
            assert "cannot move (not until something changes)" in human.stdout
            assert words in human.stdout, human.stdout
            print(f"\n$ ferry check {name} --to {h2.name}\n{human.stdout}")
            rc, lines, err = ferry_migrate(h1, name, h2.name)
            assert rc == 1 and "refused" in err and words in err, (rc, err)
            assert result_of(lines)["kind"] == "refused"
            assert container_or_none(c2, name) is None, f"{name} was created on {h2.name}"
        for name in cases:
            untouched(c1, name, since)
        # What will change is listed too: the address, and the published port's new host.
        dry = ferry(h1, "migrate", "e-peer", "--to", h2.name, "--dry-run")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert f"e-peer can move to {h2.name}" in dry.stdout
        assert "changes: the target assigns a new one" in dry.stdout
        untouched(c1, "e-peer", since)
        bad = ferry(h1, "check", "no-such-container")
        assert bad.returncode == 2 and "no container" in bad.stderr, bad.stderr
    finally:
        netns_run(h1, ["ip", "addr", "del", f"{extra}/32", "dev", "eth0"])


def _ipam(subnet: str) -> docker.types.IPAMConfig:
    return docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])


def _run_on(
    client: docker.DockerClient, name: str, net: str, ipv4_address: str, **create: Any
) -> None:
    """Run the counter on `net` with a static address (the high-level SDK cannot)."""
    api = client.api
    api.create_container(
        COUNTER,
        name=name,
        networking_config=api.create_networking_config(
            {net: api.create_endpoint_config(ipv4_address=ipv4_address)}
        ),
        **create,
    )
    client.containers.get(name).start()


def test_static_ip_mac_and_tmpfs_options_are_carried(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient], clean: None
) -> None:
    (h1, h2, _), _ = cluster
    c1, c2 = docker_clients[h1.name], docker_clients[h2.name]
    for client in (c1, c2):
        client.networks.create("elig-net", ipam=_ipam("172.31.70.0/24"))
    mount = docker.types.Mount("/scratch", "", type="tmpfs", tmpfs_size=1 << 20, tmpfs_mode=0o1770)
    _run_on(
        c1,
        "e-carry",
        "elig-net",
        "172.31.70.10",
        mac_address="02:42:ac:1f:46:99",
        ports=[8080],
        host_config=c1.api.create_host_config(
            port_bindings={8080: 18182}, mounts=[mount], network_mode="elig-net"
        ),
    )
    url = f"http://{h1.ip}:18182/"
    before = wait_for(lambda: http_get_json(h1, url), timeout=30, what="e-carry to answer")
    code, answer = _check(h1, "e-carry", "--to", h2.name)
    assert code == 0, answer
    assert any(
        "keeps its static address 172.31.70.10" in c for c in answer["eligibility"]["changes"]
    )
    rc, _lines, err = ferry_migrate(h1, "e-carry", h2.name)
    assert rc == 0, err
    moved = c2.containers.get("e-carry").attrs
    ep = moved["NetworkSettings"]["Networks"]["elig-net"]
    assert ep["IPAddress"] == "172.31.70.10"
    assert ep["MacAddress"] == "02:42:ac:1f:46:99"
    (tmpfs,) = [m for m in moved["HostConfig"]["Mounts"] if m["Type"] == "tmpfs"]
    assert tmpfs["TmpfsOptions"] == {"SizeBytes": 1 << 20, "Mode": 0o1770}
    after = wait_for(
        lambda: http_get_json(h1, f"http://{h2.ip}:18182/"), timeout=30, what="moved e-carry"
    )
    assert after["nonce"] == before["nonce"] and after["counter"] >= before["counter"]


def test_failed_rollback_restore_reports_state_lost(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient], clean: None
) -> None:
    (h1, h2, h3), agents = cluster
    c1 = docker_clients[h1.name]
    # Docker's checkpoint API stops the container at the dump, so a rollback must restore it
    # from its images (the default runc checkpointer only pauses it, and unpauses to roll back).
    _restart_with(agents, h1, [h1, h2, h3], migration={"checkpoint_via": "engine"})
    c1.containers.run(COUNTER, name="e-lost", detach=True)
    cid = c1.containers.get("e-lost").id
    try:
        with Gate(h1, "after-freeze") as gate:
            proc = migrate_in_background(h1, "e-lost", h2.name)
            mid = gate.wait()
            images = Path(h1.data_root) / "containers" / cid / "checkpoints" / f"ferry-{mid}"
            corrupted = 0
            for img in images.glob("*.img"):
                img.write_bytes(b"\0" * 64)  # CRIU cannot read these: neither side restores
                corrupted += 1
            assert corrupted, f"no checkpoint images in {images}"
        out, err = proc.communicate(timeout=300)
    finally:
        _restart_with(agents, h1, [h1, h2, h3])
    assert proc.returncode == 1, err
    assert "STATE LOST: e-lost did not keep its state" in err, err
    assert "rolled back" not in err.split("\n")[0]
    result = result_of([json.loads(x) for x in out.splitlines() if x.startswith("{")])
    assert result["kind"] == "failed" and not result["rolled_back"] and result["state_lost"]
    (rec,) = history(h1, result["report"]["migration_id"])
    assert rec.outcome == "failed" and rec.report["state_lost"].startswith("STATE LOST")
    shown = json.loads(ferry(h1, "history", "--json").stdout)
    assert (
        next(m for m in shown if m["id"] == rec.id)["report"]["state_lost"]
        == rec.report["state_lost"]
    )
    # Ferry never starts it fresh: it stays stopped, nothing runs on the target.
    assert not c1.containers.get("e-lost").attrs["State"]["Running"]
    assert container_or_none(docker_clients[h2.name], "e-lost") is None


def test_migrate_without_to_picks_a_peer_that_accepts(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient], clean: None
) -> None:
    (h1, h2, h3), _ = cluster
    c1 = docker_clients[h1.name]
    c1.containers.run(COUNTER, name="e-auto", detach=True, ports={"8080/tcp": 18183})
    # host3 has a container of that name: it refuses, so placement must choose host2.
    docker_clients[h3.name].containers.create(COUNTER, name="e-auto")
    code, answer = _check(h1, "e-auto")
    assert code == 0 and answer["pick"] == h2.name, answer
    assert not answer["eligibility"]["peers"][h3.name]["accepts"]
    proc = ferry(h1, "migrate", "e-auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"now runs on {h2.name}" in proc.stdout
    assert docker_clients[h2.name].containers.get("e-auto").status == "running"


DRAIN_FAST = """
policies:
  - name: e2e-drain-converges
    when: {marker: drain, present: true}
    cooldown: 2s
    amount: all
    action: evacuate
    targets: {peers: any, placement: spread}
"""


def test_drain_with_an_unmovable_container_converges(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    clean: None,
) -> None:
    (h1, h2, h3), agents = cluster
    c1 = docker_clients[h1.name]
    _restart_with(agents, h1, [h1, h2, h3], policies={"drain.yaml": DRAIN_FAST})
    try:
        since = time.time()
        c1.containers.run(COUNTER, name="e-stuck", detach=True, init=True, labels=OPT_IN)
        c1.containers.create(COUNTER, name="e-stopped", labels=OPT_IN)
        assert ferry(h1, "drain", "--reason", "e2e converge").returncode == 0
        evac = wait_for(
            lambda: (e := status(h1)["evacuation"]) and e.get("cannot_move") and e,
            timeout=60,
            what="drain to mark e-stuck as cannot move",
        )
        (item,) = evac["cannot_move"]
        assert item["container"] == "e-stuck" and "--init" in item["reason"]
        assert item["retry_in_s"] is None and not evac["stuck"]
        # The policy fires again every 2 s; the container is left out, not retried.
        skips = wait_for(
            lambda: [
                e
                for e in log_events(h1, "policy.skipped", "e2e-drain-converges")
                if "cannot move" in str(e.get("reason"))
            ],
            timeout=60,
            what="the drain policy to skip the unmovable container",
        )
        assert skips
        tries = [
            e
            for name in ("evacuation.migration_started", "evacuation.cannot_move")
            for e in log_events(h1, name)
            if e.get("container") == "e-stuck" and _ts(e) >= since
        ]
        assert len(tries) == 1, tries
        st = status(h1)
        unmovable = {u["container"]: u for u in st["unmovable"]}
        assert "--init" in unmovable["e-stuck"]["reason"]
        assert unmovable["e-stopped"]["state"] == "left_behind"
        text = ferry(h1, "status").stdout
        assert "cannot move:" in text and "left behind:" in text, text
        untouched(c1, "e-stuck", since)
    finally:
        ferry(h1, "undrain")
        _restart_with(agents, h1, [h1, h2, h3])

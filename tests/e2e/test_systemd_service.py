"""Ferry as a real systemd service: installed by `make install`, run by systemd as PID 1.

The module boots its own two-host systemd testbed (`python -m tests.testbed up
--systemd`, a testbed instance of its own beside the plain one the rest of the
suite uses), installs Ferry on both hosts the README's way and tears it all
down at the end; `down` fails the run if anything is left behind.

This machine lacks CAP_SYS_RESOURCE, so the unit's LimitNOFILE and
OOMScoreAdjust cannot take effect here: nothing below asserts them.

One drop-in, the way an operator tunes the unit (`systemctl edit ferry`),
shortens WatchdogSec and RestartSec so the two watchdog tests take seconds
rather than half a minute each; the tests read the values back from systemd
and hold the unit to them. tests/unit/test_systemd_unit.py checks the shipped
values.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.agents_fixtures import COUNTER
from tests.e2e.migration_support import Gate
from tests.helpers import wait_for
from tests.testbed import http_get_json
from tests.testbed.layout import INSTANCE, Host
from tests.testbed.systemd_ferry import (
    REPO,
    events,
    ferry,
    install_all,
    journal,
    main_pid,
    systemctl,
    unit_property,
)
from tests.testbed.systemd_hosts import host_argv, root_path, run_in

pytestmark = [pytest.mark.testbed, pytest.mark.e2e, pytest.mark.systemd]

# A testbed instance of its own, so the plain testbed of this run stays untouched.
SYSTEMD_INSTANCE = str(100 + int(INSTANCE or 0))
ENV = {**os.environ, "FERRY_TESTBED_ID": SYSTEMD_INSTANCE}
MAX_EXPOSURE = 5.0
SPEED_UP = "[Service]\nWatchdogSec=10s\nRestartSec=1s\n"


def _testbed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.testbed", *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sd_hosts() -> Iterator[list[Host]]:
    """Two systemd hosts with Ferry installed, configured and not yet started."""
    from tests.testbed.hosts import preflight

    why = preflight()
    if why:
        pytest.fail(f"testbed cannot run on this machine: {why}", pytrace=False)
    up = _testbed("up", "--systemd", "--hosts", "2")
    try:
        if up.returncode != 0:
            pytest.fail(f"systemd testbed failed to come up:\n{up.stderr[-3000:]}", pytrace=False)
        state = json.loads(Path(f"/run/ferry-testbed{SYSTEMD_INSTANCE}/state.json").read_text())
        hosts = [Host(**h) for h in state["hosts"]]
        assert all(h.systemd for h in hosts)
        install_all(hosts)
        for h in hosts:
            dropin = root_path(h, "/etc/systemd/system/ferry.service.d")
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "testbed-speed.conf").write_text(SPEED_UP)
            assert systemctl(h, "daemon-reload").returncode == 0
        yield hosts
    finally:
        down = _testbed("down", timeout=120)
        assert down.returncode == 0, f"systemd testbed down failed:\n{down.stderr[-3000:]}"


@pytest.fixture(scope="module")
def clients(sd_hosts: list[Host]) -> Iterator[dict[str, docker.DockerClient]]:
    made = {h.name: docker.DockerClient(base_url=h.docker_host, timeout=120) for h in sd_hosts}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture
def services(sd_hosts: list[Host]) -> list[Host]:
    """Ferry running as a service on both hosts (started where a test left it stopped)."""
    for h in sd_hosts:
        if unit_property(h, "ActiveState") != "active":
            proc = systemctl(h, "start", "ferry")
            assert proc.returncode == 0, proc.stderr
    return sd_hosts


@pytest.fixture
def fresh(clients: dict[str, docker.DockerClient], sd_hosts: list[Host]) -> Iterator[None]:
    """Each test starts and ends with no containers and no hooks on either host."""
    yield
    for h in sd_hosts:
        for hook in (Path(h.state_dir) / "hooks").glob("*"):
            hook.unlink()
    for c in clients.values():
        for container in c.containers.list(all=True):
            container.remove(force=True)


# ------------------------------------------------------------------ helpers


def run_counter(client: docker.DockerClient, name: str, port: int) -> None:
    client.containers.run(
        COUNTER, name=name, detach=True, ports={"8080/tcp": port}, labels={"ferry.migrate": "true"}
    )


def _migrate_in_background(host: Host, name: str, target: str) -> subprocess.Popen[str]:
    """`ferry migrate` inside the systemd host, as an operator's shell runs it."""
    argv = host_argv(host, ["ferry", "migrate", name, "--to", target])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def counter(host: Host, port: int, at_least: int = 0) -> dict[str, Any]:
    """The counter service's reply on `host`, asked from inside the host's network."""
    url = f"http://{host.ip}:{port}/"
    return wait_for(
        lambda: (s := http_get_json(host, url)) and s["counter"] >= at_least and s,
        timeout=60,
        what=f"counter on {host.name}:{port} to reach {at_least}",
    )


def containers_named(clients: dict[str, docker.DockerClient], name: str) -> dict[str, list[str]]:
    """Every container of this name on every host, with its state."""
    return {
        host: [c.status for c in client.containers.list(all=True, filters={"name": f"^{name}$"})]
        for host, client in clients.items()
    }


def running_on(clients: dict[str, docker.DockerClient], name: str) -> list[str]:
    return [h for h, states in containers_named(clients, name).items() if "running" in states]


_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(span: str) -> float:
    """A systemd time span as `systemctl show` prints it (`30s`, `2min`, `1min 30s`)."""
    parts = re.findall(r"([\d.]+)\s*(us|ms|min|s|h|d)", span)
    assert parts, f"not a time span: {span!r}"
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def systemd_messages(host: Host, cursor: str, unit: str) -> list[tuple[float, str]]:
    """systemd's own journal lines about `unit` after `cursor`: (time, message)."""
    out = run_in(
        host, ["journalctl", "-o", "json", "--no-pager", f"--after-cursor={cursor}", "_PID=1"]
    ).stdout
    found = []
    for line in out.splitlines():
        entry = json.loads(line)
        if entry.get("UNIT") == unit:
            message = entry["MESSAGE"].removeprefix(f"{unit}: ")
            found.append((int(entry["__REALTIME_TIMESTAMP"]) / 1e6, message))
    return found


def cursor(host: Host) -> str:
    out = run_in(host, ["journalctl", "-n", "1", "-o", "json", "--no-pager"]).stdout
    return json.loads(out.splitlines()[-1])["__CURSOR"]


def wait_restarted(host: Host, old_pid: int, timeout: float) -> int:
    """Wait for the unit to be active again under a new main PID; returns it."""

    def restarted() -> int:
        if unit_property(host, "ActiveState") != "active":
            return 0
        pid = main_pid(host)
        return pid if pid not in (0, old_pid) else 0

    return wait_for(restarted, timeout=timeout, interval=0.2, what=f"{host.name} ferry restarted")


# ------------------------------------------------------------------ tests


def test_start_returns_once_ready_and_status_shows_ferrys_line(sd_hosts: list[Host]) -> None:
    h1, h2 = sd_hosts
    # The README's last install step. host2 comes first, so host1's peer is up.
    assert systemctl(h2, "enable", "--now", "ferry").returncode == 0
    proc = systemctl(h1, "enable", "--now", "ferry")
    assert proc.returncode == 0, proc.stderr

    # No waiting from here on: Type=notify returned only after READY=1.
    assert unit_property(h1, "ActiveState") == "active"
    assert unit_property(h1, "SubState") == "running"
    shown = systemctl(h1, "status", "ferry", "--no-pager").stdout
    assert re.search(r'Status: "serving', shown), shown
    st = ferry(h1, "status", "--json")
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    # Peers are known at READY: the start-up check probed them.
    assert [(p["name"], p["reachable"]) for p in report["peers"]] == [("host2", True)]
    assert unit_property(h1, "StatusText") == report["status_line"]

    # Prerequisites were checked before READY, in this very start.
    invocation = unit_property(h1, "InvocationID")
    mine = journal(h1, f"_SYSTEMD_INVOCATION_ID={invocation}")
    order = [e.get("EVENT") for e in mine]
    assert "prereqs.criu_ok" in order and "agent.ready" in order
    assert order.index("prereqs.criu_ok") < order.index("agent.ready")
    assert order.index("peer.reachable") < order.index("agent.ready")


def test_drain_moves_a_container_with_its_state(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    h1, h2 = services
    run_counter(clients[h1.name], "sd-drain", 18081)
    before = counter(h1, 18081, at_least=3)

    assert ferry(h1, "drain", "--reason", "systemd e2e").returncode == 0
    try:
        wait_for(
            lambda: running_on(clients, "sd-drain") == [h2.name],
            timeout=120,
            what="sd-drain to run on host2 only",
        )
        after = counter(h2, 18081, at_least=before["counter"] + 1)
    finally:
        assert ferry(h1, "undrain").returncode == 0
    assert after["nonce"] == before["nonce"], "a fresh process, not the migrated one"
    assert containers_named(clients, "sd-drain") == {h1.name: [], h2.name: ["running"]}


def test_watchdog_kills_a_stopped_agent_and_the_restart_reconciles(services: list[Host]) -> None:
    h1, _ = services
    watchdog = seconds(unit_property(h1, "WatchdogUSec"))
    restart_sec = seconds(unit_property(h1, "RestartUSec"))
    assert watchdog > 0
    restarts = int(unit_property(h1, "NRestarts"))
    start_cursor = cursor(h1)
    pid = main_pid(h1)

    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    new_pid = wait_restarted(h1, pid, timeout=watchdog + restart_sec + 60)

    lines = systemd_messages(h1, start_cursor, "ferry.service")
    timeouts = [t for t, m in lines if m.startswith("Watchdog timeout")]
    assert timeouts, lines
    # Pings come every WatchdogSec/2, so the last one was at most that long before the stop.
    assert timeouts[0] - stopped_at <= watchdog + 1.0, (timeouts[0] - stopped_at, watchdog)
    assert any("Failed with result 'watchdog'" in m for _, m in lines), lines
    assert int(unit_property(h1, "NRestarts")) == restarts + 1
    assert new_pid != pid

    # The restarted agent went through its start-up again (reconcile, then READY) and serves.
    invocation = unit_property(h1, "InvocationID")
    assert events(h1, "agent.ready", f"_SYSTEMD_INVOCATION_ID={invocation}")
    assert json.loads(ferry(h1, "status", "--json").stdout)["in_doubt"] == []


def test_sigstop_mid_migration_leaves_one_running_copy_with_its_state(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    h1, h2 = services
    run_counter(clients[h1.name], "sd-held", 18082)
    before = counter(h1, 18082, at_least=3)
    pid = main_pid(h1)
    # Source side: the target holds its restored copy stopped; nothing is decided yet.
    with Gate(h1, "before-decision") as gate:
        cli = _migrate_in_background(h1, "sd-held", h2.name)
        try:
            mid = gate.wait(timeout=120)
            os.kill(pid, signal.SIGSTOP)
            # The stopped agent cannot see this; its successor must not wait on it.
            gate.release()
            watchdog = seconds(unit_property(h1, "WatchdogUSec"))
            restart = seconds(unit_property(h1, "RestartUSec"))
            wait_restarted(h1, pid, timeout=watchdog + restart + 60)
        finally:
            cli.kill()
            cli.communicate()

    wait_for(
        lambda: (
            len(running_on(clients, "sd-held")) == 1
            and all(
                s != "created" for ss in containers_named(clients, "sd-held").values() for s in ss
            )
        ),
        timeout=120,
        what="exactly one running copy of sd-held and no half-made one",
    )
    (where,) = running_on(clients, "sd-held")
    host = h1 if where == h1.name else h2
    after = counter(host, 18082, at_least=before["counter"] + 1)
    assert after["nonce"] == before["nonce"], "the running copy must be the migrated process"
    reconciled = [e for e in events(h1, "migration.reconciled") if e.get("MIGRATION") == mid]
    assert reconciled, "the restarted agent did not reconcile the interrupted migration"


def test_docker_restart_restarts_ferry_in_unit_order_and_it_keeps_working(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    h1, h2 = services
    old_pid = main_pid(h1)
    start_cursor = cursor(h1)
    assert systemctl(h1, "restart", "docker").returncode == 0
    new_pid = wait_restarted(h1, old_pid, timeout=120)
    assert new_pid != old_pid

    # Requires= + After=docker.service: ferry stops before dockerd and starts after it.
    ferry_lines = systemd_messages(h1, start_cursor, "ferry.service")
    docker_lines = systemd_messages(h1, start_cursor, "docker.service")

    def first(lines: list[tuple[float, str]], prefix: str) -> float:
        return next(t for t, m in lines if m.startswith(prefix))

    assert first(ferry_lines, "Stopped") <= first(docker_lines, "Stopping")
    assert first(docker_lines, "Started") <= first(ferry_lines, "Starting")
    # The agent exited by itself on SIGTERM, not killed at TimeoutStopSec.
    assert not [m for _, m in ferry_lines if "timed out" in m or "SIGKILL" in m], ferry_lines

    # And it keeps working: a migration from the restarted host.
    run_counter(clients[h1.name], "sd-after-docker", 18083)
    before = counter(h1, 18083, at_least=3)
    moved = ferry(h1, "migrate", "sd-after-docker", "--to", h2.name)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    after = counter(h2, 18083, at_least=before["counter"] + 1)
    assert after["nonce"] == before["nonce"]
    assert running_on(clients, "sd-after-docker") == [h2.name]


def test_stop_mid_migration_is_clean_and_leaves_no_half_made_container(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    h1, h2 = services
    run_counter(clients[h1.name], "sd-stop", 18084)
    before = counter(h1, 18084, at_least=3)
    # Frozen on the source, target container made: the worst moment to stop.
    with Gate(h1, "after-freeze") as gate:
        cli = _migrate_in_background(h1, "sd-stop", h2.name)
        try:
            gate.wait(timeout=120)
            timeout_stop = seconds(unit_property(h1, "TimeoutStopUSec"))
            started = time.monotonic()
            stop = systemctl(h1, "stop", "ferry", timeout=timeout_stop + 30)
            took = time.monotonic() - started
        finally:
            cli.kill()
            cli.communicate()
    assert stop.returncode == 0, stop.stderr
    assert took < timeout_stop, (took, timeout_stop)
    # Exited by itself, cleanly: not killed at the stop timeout.
    assert unit_property(h1, "Result") == "success"
    assert unit_property(h1, "ExecMainStatus") == "0"

    states = containers_named(clients, "sd-stop")
    assert states == {h1.name: ["running"], h2.name: []}, states
    after = counter(h1, 18084, at_least=before["counter"] + 1)
    assert after["nonce"] == before["nonce"]


def test_journal_has_ferrys_fields_as_journal_fields(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    h1, h2 = services
    run_counter(clients[h1.name], "sd-journal", 18085)
    counter(h1, 18085, at_least=1)
    moved = ferry(h1, "migrate", "sd-journal", "--to", h2.name)
    assert moved.returncode == 0, moved.stdout + moved.stderr

    started = [e for e in events(h1, "migration.started") if e.get("CONTAINER") == "sd-journal"]
    assert len(started) == 1, started
    entry = started[0]
    mid = entry["MIGRATION"]
    assert entry["TARGET"] == h2.name and entry["SYSLOG_IDENTIFIER"] == "ferry"
    assert entry["PRIORITY"] == "6"
    assert not entry["MESSAGE"].lstrip().startswith("{"), "a JSON blob inside MESSAGE"
    # journalctl can select one migration's entries by its field.
    selected = journal(h1, f"MIGRATION={mid}")
    assert len(selected) > 1 and all(e["MIGRATION"] == mid for e in selected)


def test_unit_is_the_installed_one_and_exposure_is_low(services: list[Host]) -> None:
    h1, _ = services
    installed = root_path(h1, "/etc/systemd/system/ferry.service").read_text()
    assert installed == (REPO / "systemd" / "ferry.service").read_text()
    out = systemctl(h1, "--version").stdout  # the analyzer below is this systemd's
    assert out.startswith("systemd ")
    proc = run_in(h1, ["systemd-analyze", "security", "ferry", "--no-pager"])
    m = re.search(r"Overall exposure level for ferry.service: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")


def test_postcopy_under_the_unit_serves_pages_over_criu_tls(
    services: list[Host], clients: dict[str, docker.DockerClient], fresh: None
) -> None:
    """runc and CRIU run through systemd-run here, which drops its caller's environment:
    CRIU's TLS options (CRIU_CONFIG_FILE) must still reach the source's page server. The
    target's daemon always asks for TLS, so a page server without it fails the move."""
    h1, h2 = services
    run_counter(clients[h1.name], "sd-postcopy", 18083)
    before = counter(h1, 18083, at_least=3)
    old = PIPE_MAX.read_text().strip()
    print(f"systemd post-copy test: fs.pipe-max-size {old} -> 4194304 (CRIU's page server)")
    PIPE_MAX.write_text("4194304")
    try:
        proc = ferry(h1, "migrate", "sd-postcopy", "--to", h2.name, "--postcopy", "--json")
    finally:
        PIPE_MAX.write_text(old)
        print(f"systemd post-copy test: fs.pipe-max-size back to {old}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    report = next(x for x in reversed(lines) if x.get("type") == "result")["report"]
    assert report["details"].get("postcopy_port"), report["details"]  # it went post-copy
    after = counter(h2, 18083, at_least=before["counter"] + 1)
    assert after["nonce"] == before["nonce"], "a fresh process, not the migrated one"
    assert containers_named(clients, "sd-postcopy") == {h1.name: [], h2.name: ["running"]}
    # The target's page daemon ran under its guard, in a transient unit of systemd's:
    # outside ferry.service, so a restart of the agent cannot take the guard with it.
    pid1 = run_in(h2, ["journalctl", "-o", "json", "--no-pager", "_PID=1"]).stdout.splitlines()
    entries = [json.loads(x) for x in pid1 if x.startswith("{")]
    guards = {
        e["UNIT"]
        for e in entries
        if "agent.page_guard" in str(e.get("MESSAGE")) and str(e.get("UNIT")).startswith("run-")
    }
    assert guards, "systemd started no page guard on the target"
    ended = {e["UNIT"] for e in entries if "Deactivated successfully" in str(e.get("MESSAGE"))}
    assert guards <= ended, (guards, ended)

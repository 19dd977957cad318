"""A third-party plugin package, end to end: installed with pip, configured, and acted on.

examples/ferry-http-probe is pip-installed (from a local copy, no index) into
the venv the agents run from. host1's agent probes a URL served on host1's own
loopback by this test; when the test makes it fail, a policy on the plugin's
signal fires the plugin's action, which evacuates a counter container to host2
through the agent and then runs a command that writes the outcome to a file
the test owns. The package is uninstalled afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.agents_fixtures import (
    counter_state,
    log_events,
    run_counter,
    status,
    where_running,
)
from tests.helpers import wait_for
from tests.testbed import http_get_json
from tests.testbed.agents import agents_down, agents_up
from tests.testbed.layout import Host
from tests.testbed.procs import netns_argv

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ferry-http-probe"
HEALTH_PORT = 18081  # on host1's loopback, inside its network namespace
COUNTER_PORT = 8131

POLICY = """
policies:
  - name: e2e-http-down
    description: the probed service stopped answering 200; move the counter away and say so
    when: {signal: http_probe.web.up, op: "<", value: 1}
    clear_when: {signal: http_probe.web.up, op: ">=", value: 1}
    for: 2s
    cooldown: 10m
    select: {name: "probe-*"}
    amount: all
    action: evacuate-and-record
    targets: any
"""


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def example_installed(tmp_path: Path) -> Iterator[None]:
    # A copy, so the build's own leftovers (build/, *.egg-info) stay out of the checkout.
    src = tmp_path / "ferry-http-probe"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("tests", "__pycache__"))
    installed = _pip(
        "install", "--quiet", "--no-index", "--no-build-isolation", "--no-deps", str(src)
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    try:
        yield
    finally:
        removed = _pip("uninstall", "--yes", "ferry-http-probe")
        assert removed.returncode == 0, removed.stderr[-2000:]


@pytest.fixture
def health_server(tmp_path: Path, testbed_hosts: list[Host]) -> Iterator[Path]:
    """An HTTP server on host1's 127.0.0.1; the test deletes `health` to make probes fail."""
    root = tmp_path / "www"
    root.mkdir()
    health = root / "health"
    health.write_text('{"ok": true}')
    h1 = testbed_hosts[0]
    argv = [sys.executable, "-m", "http.server", str(HEALTH_PORT)]
    server = subprocess.Popen(
        netns_argv(h1, [*argv, "--bind", "127.0.0.1", "--directory", str(root)]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{HEALTH_PORT}/health"
        wait_for(lambda: http_get_json(h1, url)["ok"], timeout=30, what="the health server")
        yield health
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_plugin_signal_fires_a_policy_and_the_agent_runs_the_plugin_action(
    testbed_hosts, docker_clients, clean_containers, example_installed, health_server, tmp_path
):
    if len(testbed_hosts) < 2:
        pytest.fail("this test needs 2 testbed hosts: `python -m tests.testbed up --hosts 2`")
    h1, h2 = testbed_hosts[:2]
    outcome = tmp_path / "outcome.json"
    record = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.stdin.read())"
    overrides: dict[str, object] = {
        "signals": {
            "poll_interval": "1s",
            "plugins": [
                {
                    "type": "http_probe",
                    "name": "web",
                    "url": f"http://127.0.0.1:{HEALTH_PORT}/health",
                    "interval": "1s",
                    "timeout": "1s",
                }
            ],
        },
        "actions": {
            "plugins": [
                {
                    "type": "evacuate_then_run",
                    "name": "evacuate-and-record",
                    "argv": [sys.executable, "-c", record, str(outcome)],
                }
            ]
        },
    }
    run_counter(docker_clients[h1.name], "probe-ctr", COUNTER_PORT)
    before = counter_state(h1, h1, COUNTER_PORT, at_least=3)
    agents_up([h1, h2], {h1.name: {"http.yaml": POLICY}, h2.name: {}}, overrides)
    try:
        # The plugin's signal reaches the agent's store while the service answers.
        signals = wait_for(
            lambda: (s := status(h1)["signals"]) and s.get("http_probe.web.up") == 1.0 and s,
            timeout=30,
            what="host1 to report http_probe.web.up = 1",
        )
        assert signals["http_probe.web.status"] == 200.0
        assert 0 <= signals["http_probe.web.latency_seconds"] < 1
        assert where_running(docker_clients, "probe-ctr") == [h1.name]
        assert not outcome.exists()

        health_server.unlink()  # now 404: the probe reads down

        record_text = wait_for(
            lambda: outcome.exists() and outcome.read_text(),
            timeout=120,
            what="the plugin action to write its outcome",
        )
        result = json.loads(record_text)
        assert result["policy"] == "e2e-http-down" and result["host"] == h1.name
        assert result["ok"] is True, result
        assert result["containers"] == {"probe-ctr": f"moved to {h2.name}"}, result
        assert status(h1)["signals"]["http_probe.web.status"] == 404.0
        # The policy acted: the counter runs once, on host2, with its state.
        assert where_running(docker_clients, "probe-ctr") == [h2.name]
        after = counter_state(h1, h2, COUNTER_PORT, at_least=before["counter"])
        assert after["nonce"] == before["nonce"], "the counter restarted instead of moving"
        firing = log_events(h1, "policy.firing", "e2e-http-down")
        assert len(firing) == 1, firing
        done = wait_for(
            lambda: log_events(h1, "policy.action_done", "e2e-http-down"),
            timeout=30,
            what="the policy to report its action done",
        )
        assert "ran " in done[0]["reason"], done
    finally:
        agents_down([h1, h2])

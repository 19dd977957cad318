"""The commit protocol on the testbed: a held target copy never runs without the source's commit.

The two ways Ferry used to end with two running copies (a lost restore answer,
a target agent gone at the commit) and the operator's way out of "in doubt".
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.migration import held
from tests.e2e.agents_fixtures import counter_state
from tests.e2e.migration_support import (
    COUNTER,
    Agents,
    Gate,
    container_or_none,
    engine_agents,
    history,
    migrate_in_background,
)
from tests.helpers import wait_for
from tests.testbed import cut_link, restore_link
from tests.testbed import procs as tb_procs
from tests.testbed.agents import REPO
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

NAME = "mig-commit"
PORT = 18082
# Short enough that a test waits seconds, not minutes, for each timeout to fire.
OVERRIDES = {"migration": {"restore_timeout": "10s", "commit_timeout": "4s", "stall_timeout": "8s"}}


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts, **OVERRIDES) as agents:
        yield hosts, agents


@pytest.fixture
def counter(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[dict[str, Any]]:
    (h1, h2), agents = cluster
    docker_clients[h1.name].containers.run(
        COUNTER, name=NAME, detach=True, ports={"8080/tcp": PORT}, restart_policy={"Name": "always"}
    )
    yield counter_state(h1, h1, PORT, at_least=3)
    for h in (h1, h2):
        restore_link(h)
        agents.start(h)
        for name in ("before-restore", "before-continue"):
            Gate(h, name).release()
    for client in docker_clients.values():
        c = container_or_none(client, NAME)
        if c is not None:
            c.remove(force=True)


def _copies(clients: dict[str, docker.DockerClient]) -> dict[str, str]:
    """Host -> Docker status of the test container, wherever one exists."""
    out = {}
    for host, client in clients.items():
        c = container_or_none(client, NAME)
        if c is not None:
            out[host] = c.status
    return out


def _held_stopped(client: docker.DockerClient) -> bool:
    """Docker says running, yet every process of the copy is stopped (state T)."""
    c = container_or_none(client, NAME)
    return c is not None and held.all_stopped(held.container_processes(c.id))


def _ferry(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    assert host.agent_config
    argv = [sys.executable, "-m", "agent", *args, "--config", host.agent_config]
    return subprocess.run(
        tb_procs.netns_argv(host, argv), capture_output=True, text=True, timeout=120, cwd=REPO
    )


def _same_process(host: Host, before: dict[str, Any]) -> None:
    after = counter_state(host, host, PORT, at_least=before["counter"] + 2)
    assert after["nonce"] == before["nonce"], "a fresh process answered, not the original"
    assert abs(after["lines"] - after["counter"]) <= 1, after


def test_lost_restore_answer_rolls_back_and_the_held_copy_never_runs(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    counter: dict[str, Any],
) -> None:
    (h1, h2), _ = cluster
    with Gate(h2, "before-restore") as gate:
        cli = migrate_in_background(h1, NAME, h2.name)
        gate.wait()
        cut_link(h2)  # the restore happens, its answer never arrives
    wait_for(lambda: _held_stopped(docker_clients[h2.name]), 60, what="the target to hold its copy")
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 1, err
    assert "rolled back" in err, err
    mid = json.loads(out.splitlines()[-1])["report"]["migration_id"]
    assert history(h1, mid)[0].report["decision"] == "rollback"
    # The source runs it again; the target still holds its stopped copy, never running.
    _same_process(h1, counter)
    assert _held_stopped(docker_clients[h2.name]), "the target copy ran without a commit"

    restore_link(h2)  # the target asks the source, hears "rollback", removes its copy
    wait_for(
        lambda: h2.name not in _copies(docker_clients) and history(h2, mid)[0].outcome,
        90,
        what="the held copy to go",
    )
    assert _copies(docker_clients) == {h1.name: "running"}
    assert history(h2, mid)[0].outcome == "aborted"
    assert not any(Path(h2.data_root, "ferry", "criu").glob(f"{mid}*"))
    _same_process(h1, counter)


def test_target_gone_at_the_commit_is_in_doubt_then_resolves_itself(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    counter: dict[str, Any],
) -> None:
    (h1, h2), agents = cluster
    with Gate(h2, "before-continue") as gate:
        cli = migrate_in_background(h1, NAME, h2.name)
        gate.wait()
        agents.stop(h2, signal.SIGKILL)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 1, err
    assert "IN DOUBT" in err, err
    mid = json.loads(out.splitlines()[-1])["report"]["migration_id"]
    # Nothing runs: the source copy is frozen in place (the default runc checkpointer)
    # with its images, the target copy held.
    assert _copies(docker_clients)[h1.name] == "paused"
    assert _held_stopped(docker_clients[h2.name])
    status = _ferry(h1, "status", "--json")
    assert status.returncode == 1, "in doubt must make `ferry status` fail"
    assert [m["id"] for m in json.loads(status.stdout)["in_doubt"]] == [mid]

    agents.start(h2)  # it asks the source, hears "commit", and lets its copy run
    wait_for(lambda: history(h1, mid)[0].outcome == "succeeded", 90, what="the source to learn it")
    assert _copies(docker_clients) == {h2.name: "running"}
    _same_process(h2, counter)
    assert history(h2, mid)[0].outcome == "succeeded"


def test_operator_keeps_the_source_when_the_target_is_lost(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    counter: dict[str, Any],
) -> None:
    (h1, h2), agents = cluster
    with Gate(h2, "before-continue") as gate:
        cli = migrate_in_background(h1, NAME, h2.name)
        gate.wait()
        agents.stop(h2, signal.SIGKILL)
    out, _ = cli.communicate(timeout=120)
    mid = json.loads(out.splitlines()[-1])["report"]["migration_id"]
    assert history(h1, mid)[0].outcome == "in_doubt"
    docker_clients[h2.name].containers.get(NAME).remove(force=True)  # the target host is lost

    resolved = _ferry(h1, "resolve", mid, "--keep", "source")
    assert resolved.returncode == 0, resolved.stderr
    assert _copies(docker_clients) == {h1.name: "running"}
    _same_process(h1, counter)
    assert history(h1, mid)[0].outcome == "rolled_back"

    agents.start(h2)  # its journal still names the lost copy: reconcile finishes the row
    assert history(h2, mid)[0].outcome == "aborted"
    again = _ferry(h1, "resolve", mid, "--keep", "target")
    assert again.returncode == 2 and "already ended" in again.stderr

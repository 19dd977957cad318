"""Local lazy restore on the testbed: the default restore path.

Docker gets the checkpoint without its memory pages; a CRIU lazy-pages daemon
on the target fills them in from the full local copy, while the copy is held and
after the commit lets it run. The memhog's checksum series must continue (same
memory, same process), and a daemon that dies, before the commit or while the
copy already runs, is replaced and the restore retried from the local images.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.e2e.agents_fixtures import log_events
from tests.e2e.migration_support import (
    MEMHOG,
    Gate,
    container_or_none,
    engine_agents,
    ferry_migrate,
    migrate_in_background,
    readings,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed import agents as testbed_agents
from tests.testbed import procs
from tests.testbed.layout import Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

NAME = "lazy-hog"


@pytest.fixture(scope="module")
def agents(testbed_hosts: list[Host]) -> Iterator[list[Host]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts, migration={"restore_via": "lazy"}):
        yield hosts


@pytest.fixture
def hog(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[docker.models.containers.Container]:
    h1, _ = agents
    yield docker_clients[h1.name].containers.run(
        MEMHOG, name=NAME, detach=True, environment={"MEMHOG_MIB": "128"}
    )
    for client in docker_clients.values():
        c = container_or_none(client, NAME)
        if c is not None:
            c.remove(force=True)


def _continues(
    before: list[tuple[int, str]], container: docker.models.containers.Container
) -> None:
    after = wait_for(
        lambda: (r := readings(container)) and r[-1][0] > before[-1][0] and r,
        timeout=60,
        what="the memhog to go on",
    )
    # Same process (the iteration goes on, never back to 0), same memory (same checksum).
    assert after[0][0] >= before[-1][0], (before, after)
    assert {c for _, c in before + after} == {before[0][1]}


def _ctrd_copies(host: Host) -> set[str]:
    return {p.name for p in Path(host.host_dir, "tmp").glob("ctrd-checkpoint*")}


def _no_lazy_leftovers(host: Host, ctrd_before: set[str]) -> None:
    criu_dir = Path(host.data_root, "ferry", "criu")
    leftovers = list(criu_dir.glob("*")) if criu_dir.exists() else []
    assert not leftovers, leftovers
    # containerd's copy of each restored checkpoint is removed too.
    assert _ctrd_copies(host) <= ctrd_before, _ctrd_copies(host) - ctrd_before


def test_there_and_back_with_every_page(
    agents: list[Host],
    docker_clients: dict[str, docker.DockerClient],
    hog: docker.models.containers.Container,
) -> None:
    h1, h2 = agents
    ctrd = {h.name: _ctrd_copies(h) for h in agents}
    before = wait_for(lambda: len(r := readings(hog)) >= 2 and r, timeout=60, what="readings")
    for src, dst in ((h1, h2), (h2, h1)):
        rc, lines, err = ferry_migrate(src, NAME, dst.name, timeout=600)
        assert rc == 0, err
        timings = result_of(lines)["report"]["details"]["target_timings"]
        # Docker was handed only the eager pages; the daemon brought the 128 MiB.
        assert timings["lazy_pages"] * 4096 >= 128 * 1024 * 1024, timings
        assert timings["present_pages"] < 256, timings
        moved = docker_clients[dst.name].containers.get(NAME)
        _continues(before, moved)
        before = readings(moved)
        assert container_or_none(docker_clients[src.name], NAME) is None
        _no_lazy_leftovers(dst, ctrd[dst.name])


def _lazy_daemons(mid: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # CRIU itself: not its page guard, nor the nsenter between them.
            if (
                Path(argv[0].decode()).name == "criu"
                and b"lazy-pages" in argv
                and any(mid.encode() in a for a in argv)
            ):
                pids.append(int(entry.name))
    return pids


def test_a_dead_lazy_pages_daemon_is_replaced_and_the_restore_retried(
    agents: list[Host],
    docker_clients: dict[str, docker.DockerClient],
    hog: docker.models.containers.Container,
) -> None:
    h1, h2 = agents
    ctrd = _ctrd_copies(h2)
    before = wait_for(lambda: len(r := readings(hog)) >= 2 and r, timeout=60, what="readings")
    gate = Gate(h2, "lazy-daemon").arm()
    try:
        cli = migrate_in_background(h1, NAME, h2.name)
        mid = gate.wait(timeout=120)
        daemons = _lazy_daemons(mid)
        assert daemons, "no criu lazy-pages process for this migration"
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
    finally:
        gate.release()
    _, err = cli.communicate(timeout=300)
    assert cli.returncode == 0, err
    failed = [e for e in log_events(h2, "migration.target.lazy_failed") if e["migration"] == mid]
    assert [e["attempt"] for e in failed] == [1], failed
    assert container_or_none(docker_clients[h1.name], NAME) is None
    _continues(before, docker_clients[h2.name].containers.get(NAME))
    _no_lazy_leftovers(h2, ctrd)


def _stop_live(pids: list[int]) -> list[int]:
    """SIGSTOP those of `pids` still running (not exited, not a zombie)."""
    stopped = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    return stopped


@contextlib.contextmanager
def _big_hog(
    clients: dict[str, docker.DockerClient], h1: Host, name: str
) -> Iterator[docker.models.containers.Container]:
    """A 1 GiB memhog: its daemon takes about a second to fill it, time to stop it."""
    try:
        yield clients[h1.name].containers.run(
            MEMHOG, name=name, detach=True, environment={"MEMHOG_MIB": "1024"}
        )
    finally:
        for client in clients.values():
            c = container_or_none(client, name)
            if c is not None:
                c.remove(force=True)


def _running_with_pages_missing(
    h1: Host, h2: Host, hog: docker.models.containers.Container
) -> tuple[subprocess.Popen[str], str, list[tuple[int, str]], list[int]]:
    """Migrate `hog` with the target's daemon stopped while the copy is held, and return
    once the commit let the copy run with pages still missing: (the CLI, the migration,
    the readings before, the stopped daemon's pids, which the caller kills)."""
    before = wait_for(lambda: len(r := readings(hog)) >= 2 and r, timeout=120, what="readings")
    gate = Gate(h1, "before-decision").arm()
    try:
        cli = migrate_in_background(h1, hog.name, h2.name)
        mid = gate.wait(timeout=120)  # the target holds its copy
        stopped = _stop_live(_lazy_daemons(mid))
        assert stopped, "the daemon had filled every page in before it could be stopped"
    finally:
        gate.release()
    try:
        wait_for(
            lambda: any(
                e["migration"] == mid and e.get("filling")
                for e in log_events(h2, "migration.target.running")
            ),
            timeout=120,
            what="the commit while pages are still missing",
        )
    except BaseException:
        _kill(stopped)
        raise
    return cli, mid, before, stopped


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_daemon_dying_while_the_copy_runs_is_replaced_and_the_copy_restored_again(
    agents: list[Host],
    docker_clients: dict[str, docker.DockerClient],
) -> None:
    """The daemon is stopped while the copy is held, so pages are still missing when
    the commit lets the copy run: its page faults wait. Then the daemon is killed. The
    copy must not run on zero pages: it is killed and restored again from the local
    images, and continued."""
    h1, h2 = agents
    name = "lazy-hog-big"
    ctrd = _ctrd_copies(h2)
    with _big_hog(docker_clients, h1, name) as hog:
        cli, mid, before, stopped = _running_with_pages_missing(h1, h2, hog)
        _kill(stopped)
        _, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, err
        failed = [
            e for e in log_events(h2, "migration.target.lazy_failed") if e["migration"] == mid
        ]
        assert [(e["attempt"], e["running"]) for e in failed] == [(1, True)], failed
        assert container_or_none(docker_clients[h1.name], name) is None
        _continues(before, docker_clients[h2.name].containers.get(name))
        _no_lazy_leftovers(h2, ctrd)


def test_a_daemon_dying_while_the_agent_is_dead_takes_the_running_copy_with_it(
    agents: list[Host],
    docker_clients: dict[str, docker.DockerClient],
) -> None:
    """As above, but the target's agent is dead when the daemon dies, and stays dead: the
    copy must not run on. Its page guard kills it; a copy blocked on a missing page
    may crash on the zero page the kernel hands it first (this memhog does: exit 139),
    which the guard cannot outrun. Either way it stays down until the restarted agent
    restores it again from the local images and lets it go on. (The post-copy tests
    show the guard's kill where the copy would run on.)"""
    h1, h2 = agents
    name = "lazy-hog-orphan"
    with _big_hog(docker_clients, h1, name) as hog:
        cli, mid, before, stopped = _running_with_pages_missing(h1, h2, hog)
        try:
            testbed_agents.stop_agent(h2, signal.SIGKILL)
        finally:
            _kill(stopped)
        try:
            copy = docker_clients[h2.name].containers.get(name)
            wait_for(
                lambda: (copy.reload(), copy.status)[1] == "exited",
                timeout=30,
                what="the copy to stop",
            )
            assert not procs.alive(h2.agent_pid)  # its agent did not stop it
            source = container_or_none(docker_clients[h1.name], name)
            assert source is None or source.status != "running"  # the commit was final
        finally:
            testbed_agents.start_agent(h2)
        wait_for(
            lambda: any(e["migration"] == mid for e in log_events(h2, "migration.target.refill")),
            timeout=120,
            what="the restarted agent to restore the copy again",
        )
        _continues(before, docker_clients[h2.name].containers.get(name))
        _, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, err

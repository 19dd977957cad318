"""The chaos suite's cluster, workload, gates and background migrations.

A module shares one cluster (real `ferry run` agents with short timeouts, so a
fault's consequences land within seconds); every test gets a fresh memhog and
leaves the hosts healed (links up and unthrottled, daemons and agents running,
no gate armed, its containers gone) whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from tests.chaos.invariants import (
    CASE_LABEL,
    Workload,
    assert_invariants,
    copies,
    journal_rows,
    readings,
)
from tests.e2e.migration_support import (
    MEMHOG,
    Agents,
    engine_agents,
    hook_path,
    migrate_in_background,
)
from tests.helpers import wait_for
from tests.testbed import faults, procs
from tests.testbed.layout import Host

HOG_NAME = "chaos-hog"
HOG_MIB = 32  # big enough to take a visible moment to move, small enough to stay quick

# Timeouts of the chaos cluster's agents: short, so that "longer than the timeout"
# is a few seconds of outage, not minutes.
STALL_TIMEOUT_S = 3.0
COMMIT_TIMEOUT_S = 3.0
# Fault lengths: an outage shorter than every timeout, and one well past them.
QUICK_OUTAGE_S = 1.0
SLOW_OUTAGE_S = max(STALL_TIMEOUT_S, COMMIT_TIMEOUT_S) + 2
METRICS_PORT = 9464


def chaos_config() -> dict[str, Any]:
    return {
        "migration": {
            "stall_timeout": f"{STALL_TIMEOUT_S:g}s",
            "commit_timeout": f"{COMMIT_TIMEOUT_S:g}s",
            # A restore call whose answer is lost waits this + 30 s (the engine's margin).
            "restore_timeout": "10s",
        },
        # On the host's own loopback: tests read ferry_migrations_in_doubt there.
        "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
    }


@dataclass
class Cluster:
    hosts: list[Host]
    agents: Agents
    clients: dict[str, docker.DockerClient]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)


@contextmanager
def chaos_cluster(
    hosts: list[Host], clients: dict[str, docker.DockerClient], **overrides: Any
) -> Iterator[Cluster]:
    for h in hosts:
        _disarm_hooks(h)
    config = chaos_config()
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    with engine_agents(hosts, **config) as agents:
        yield Cluster(hosts, agents, {h.name: clients[h.name] for h in hosts})


def heal(cluster: Cluster, workload: Workload) -> None:
    """Undo every fault a test may have left: links, throttles, gates, daemons, agents.

    An agent still holding one of the test's migrations unfinished (a failed
    test) is restarted, so its reconcile ends it and the next test starts clean.
    """
    for h in cluster.hosts:
        faults.restore_link(h)
        faults.clear_rate_limit(h)
        _disarm_hooks(h)
        faults.unfill_disk(h)
    for h in cluster.hosts:
        if not procs.alive(h.dockerd_pid):
            faults.start_dockerd(h)
        stuck = [r for r in journal_rows(h) if r.started >= workload.since and r.outcome is None]
        if stuck and procs.alive(h.agent_pid):
            cluster.agents.stop(h)
        if not procs.alive(h.agent_pid):
            cluster.agents.start(h)


def _disarm_hooks(host: Host) -> None:
    hooks = hook_path(host, "x").parent
    for f in hooks.iterdir():
        f.unlink(missing_ok=True)


# ---------------------------------------------------------------- the workload


def start_memhog(cluster: Cluster, host: Host, name: str = HOG_NAME) -> Workload:
    """A memhog (restart policy always, opted in) that has printed a few readings."""
    since = time.time()
    case = uuid.uuid4().hex[:12]
    c = cluster.clients[host.name].containers.run(
        MEMHOG,
        name=name,
        detach=True,
        environment={"MEMHOG_MIB": str(HOG_MIB)},
        labels={"ferry.migrate": "true", CASE_LABEL: case},
        restart_policy={"Name": "always"},
    )
    # Past iteration 0: a copy that starts from scratch prints 0 again, unmistakably.
    series = wait_for(
        lambda: (r := readings(c)) and r[-1][0] >= 1 and r,
        timeout=60,
        what=f"{name} to print its second reading",
    )
    return Workload(name, case, series[-1][1], series[-1][0], c.id, since)


def take_over_memhog(cluster: Cluster, previous: Workload | None) -> Workload:
    """Carry `previous` into a new test if it is sound; else start a fresh memhog.

    Sound: the invariants hold right now (one running copy, state continuing,
    nothing left over). Its host is then put first in `cluster.hosts`, so tests
    move it from hosts[0] as with a fresh one.
    """
    if previous is not None:
        previous.since = time.time()  # the new test's journal rows are its own
        try:
            here = assert_invariants(cluster.hosts, cluster.clients, previous, timeout=10)
        except AssertionError:
            here = None
        if here is not None:
            cluster.hosts.sort(key=lambda h: h.name != here.host)
            return previous
        remove_workload(cluster, previous)
    cluster.hosts.sort(key=lambda h: h.name)
    return start_memhog(cluster, cluster.hosts[0])


def remove_workload(cluster: Cluster, workload: Workload) -> None:
    for c in copies(cluster.hosts, cluster.clients, workload):
        # Its daemon may be away; the next test's start-up then fails on the name, loudly.
        with contextlib.suppress(docker.errors.DockerException):
            cluster.clients[c.host].containers.get(c.id).remove(force=True)


# ---------------------------------------------------------------- gates


# ---------------------------------------------------------------- background migrations


class Migration:
    """`ferry migrate --json` running in the background; its progress lines as they come."""

    def __init__(self, src: Host, name: str, dst: Host) -> None:
        self.src, self.dst = src, dst
        self.proc = migrate_in_background(src, name, dst.name)
        self.lines: list[dict[str, Any]] = []
        self._partial = b""

    def _take(self, data: bytes) -> None:
        self._partial += data
        *whole, self._partial = self._partial.split(b"\n")
        for raw in whole:
            if raw.strip().startswith(b"{"):
                self.lines.append(json.loads(raw))

    def wait_progress(self, phase: str, min_bytes: int = 0, timeout: float = 60.0) -> None:
        """Wait for a progress line of `phase` with at least `min_bytes` done."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout

        def seen() -> bool:
            return any(
                x.get("phase") == phase and int(x.get("bytes_done") or 0) >= min_bytes
                for x in self.lines
            )

        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not seen():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {phase} progress >= {min_bytes} B in {timeout}s")
                if sel.select(left):
                    data = os.read(fd, 65536)
                    if not data:
                        raise AssertionError(f"migrate ended before {phase} >= {min_bytes} B")
                    self._take(data)

    def finish(self, timeout: float = 120.0) -> tuple[int, dict[str, Any] | None, str]:
        """(exit code, result line or None, stderr) once `ferry migrate` has exited."""
        out, err = self.proc.communicate(timeout=timeout)
        self._take(out.encode() + b"\n")
        results = [x for x in self.lines if x.get("type") == "result"]
        return self.proc.returncode, (results[-1] if results else None), err

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def source_row_phase(host: Host, workload: Workload) -> str | None:
    """The phase of the workload's newest source-side migration on `host`, if any."""
    rows = [
        r
        for r in journal_rows(host)
        if r.role == "source" and r.started >= workload.since and r.outcome is None
    ]
    return max(rows, key=lambda r: r.started).phase if rows else None


def newest_mid(host: Host, workload: Workload, role: str = "source") -> str:
    rows = [r for r in journal_rows(host) if r.role == role and r.started >= workload.since]
    assert rows, f"{host.name} journalled no {role} migration for this test"
    return max(rows, key=lambda r: r.started).id


def never_two_running(cluster: Cluster, workload: Workload, seconds: float) -> None:
    """An outage that lasts `seconds`, watched throughout: never two running copies."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        running = [c for c in copies(cluster.hosts, cluster.clients, workload) if c.running]
        assert len(running) <= 1, f"two running copies during the outage: {running}"
        time.sleep(0.25)  # sampling period of the watch, not a wait for anything


def ferry_cli(host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `ferry ARGS --config <host's config>` in the host's network namespace."""
    from tests.e2e.agents_fixtures import ferry

    return ferry(host, *args, timeout=timeout)


def metric(host: Host, name: str) -> float | None:
    """A gauge from the host agent's /metrics (on the host's loopback), or None if absent."""
    proc = faults.netns_run(
        host,
        [
            "python3",
            "-c",
            "import sys,urllib.request;"
            "print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())",
            f"http://127.0.0.1:{METRICS_PORT}/metrics",
        ],
    )
    if proc.returncode != 0:
        raise AssertionError(f"{host.name} /metrics: {proc.stderr.strip()[-300:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(None, 1)[1])
    return None


def log_excerpt(host: Host, mid: str, lines: int = 40) -> str:
    """The agent log lines about one migration (for failure messages)."""
    text = Path(host.agent_log).read_text(errors="replace").splitlines()
    return "\n".join([x for x in text if mid in x][-lines:])


def assert_reported_in_doubt(host: Host, mid: str) -> None:
    """An in-doubt migration is loud: status (exit 1) and the metric show it."""
    proc = ferry_cli(host, "status", "--json")
    assert proc.returncode == 1, f"status should exit 1 while in doubt: {proc.stderr}"
    assert mid in [m["id"] for m in json.loads(proc.stdout)["in_doubt"]], proc.stdout[-2000:]
    assert (metric(host, "ferry_migrations_in_doubt") or 0) >= 1


def assert_outcome(
    src: Host,
    mid: str,
    rc: int,
    result: dict[str, Any] | None,
    err: str,
    committed: bool,
    peer_away: bool = False,
) -> None:
    """What `ferry migrate` reported, against what the protocol allows at that point.

    Before the source journalled "commit" the only safe end is a rollback; after
    it, the migration succeeded or is in doubt, never rolled back. With the peer
    still away (`peer_away`) an in-doubt migration cannot have resolved yet, so
    status and the metric must show it too.
    """
    assert result is not None, f"no result line (exit {rc}): {err[-2000:]}"
    if not committed:
        assert rc == 1 and result["kind"] == "failed" and result["rolled_back"], (result, err)
    elif rc == 0:
        assert result["ok"], result
    else:
        assert rc == 1 and result.get("in_doubt"), (result, err)
        assert "IN DOUBT" in err and f"ferry resolve {mid}" in err, err
        if peer_away:
            assert_reported_in_doubt(src, mid)

"""What must hold across every testbed host after any fault: the chaos suite's one check.

`assert_invariants` waits (with a deadline: agents resolve things in the
background) until, across all hosts:

- exactly one running copy of the workload, by name and by its per-case label
  (a copy renamed by Ferry still carries the label); or, when the test expects
  the migration to be in doubt, no running copy and its state kept;
- the state kept: the memhog's checksum is unchanged and its iteration count
  carries on from before the fault (a fresh start prints 0 again);
- no leftovers: checkpoint dirs, staging dirs, CRIU config files and CRIU work
  dirs of finished migrations, stopped containers Ferry made, unfinished
  journal rows;

and `assert_retry_works` then moves the workload once more and checks it again.

"Running" means Docker says running *and* its processes are not all stopped
(state T): a copy restored with CRIU's leave-stopped looks running to Docker.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors

from tests.e2e.migration_support import ferry_migrate, result_of
from tests.helpers import DeadlineExceeded, wait_for
from tests.testbed.layout import INSTANCE, Host

CASE_LABEL = "ferry.chaos.case"
JOURNAL = "journal.sqlite3"
IN_DOUBT = "in_doubt"
Expect = Literal["running", "in_doubt"]

_READING = re.compile(r"iter=(\d+) mib=(\d+) checksum=([0-9a-f]+)")
_CKPT_MID = re.compile(r"^ferry-(.+?)(?:-rb\d+)?$")


@dataclass
class Workload:
    """The memhog a test moves around, and what it had printed before the fault."""

    name: str
    case: str  # value of CASE_LABEL; unique per test
    checksum: str  # memhog's checksum for its size (constant while its memory is intact)
    last_iter: int  # highest iteration seen so far, on whichever copy ran
    origin: str  # id of the container it was started in (the only one that may print 0)
    since: float  # wall-clock start of the test: journal rows older than this are not its own


@dataclass
class Copy:
    host: str
    id: str
    name: str
    docker_status: str
    proc_states: list[str]

    @property
    def stopped(self) -> bool:
        """Not running application code: exited, or every process stopped (T)."""
        if self.docker_status != "running":
            return True
        return bool(self.proc_states) and all(s in ("T", "t") for s in self.proc_states)

    @property
    def running(self) -> bool:
        return not self.stopped


@dataclass
class JournalRow:
    host: str
    id: str
    role: str
    phase: str
    outcome: str | None
    reason: str | None
    started: float
    container_id: str
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def target_container(self) -> str | None:
        # A target row's report keeps what it made under "target" (a source row's
        # "target" is the peer's name).
        made = self.report.get("target") if self.role == "target" else None
        cid = made.get("container_id") if isinstance(made, dict) else None
        return str(cid) if cid else None


# ---------------------------------------------------------------- reading the hosts


def journal_rows(host: Host) -> list[JournalRow]:
    """Every row of the host's journal, read-only (the agent may be writing; WAL allows it)."""
    path = Path(host.state_dir) / JOURNAL
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT id, role, phase, outcome, reason, started, container_id, report FROM migrations"
        ).fetchall()
    finally:
        db.close()
    return [
        JournalRow(host.name, r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7] or "{}"))
        for r in rows
    ]


def process_states(host: Host, container_id: str) -> list[str]:
    """The state letter (R, S, T, ...) of every process in the container's cgroup."""
    procs = Path(f"/sys/fs/cgroup/pids/ferry-testbed{INSTANCE}-{host.name}/{container_id}")
    try:
        pids = (procs / "cgroup.procs").read_text().split()
    except OSError:
        return []
    states = []
    for pid in pids:
        try:
            states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return states


def lazy_daemons(hosts: list[Host], mids: Iterable[str]) -> list[tuple[int, str | None]]:
    """(pid, migration id or None) of every `criu lazy-pages` process of these hosts."""
    nets = {os.stat(h.netns_path).st_ino for h in hosts if os.path.exists(h.netns_path)}
    found: list[tuple[int, str | None]] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"lazy-pages" not in argv or os.stat(proc / "ns" / "net").st_ino not in nets:
                continue
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        found.append((int(proc.name), next((m for m in mids if m in text), None)))
    return found


def copies(
    hosts: list[Host], clients: dict[str, docker.DockerClient], workload: Workload
) -> list[Copy]:
    """Every container on any host that is this workload (by label or by name)."""
    found: dict[str, Copy] = {}
    for h in hosts:
        client = clients[h.name]
        # sparse: the listing itself, no inspect per container (which races with removals).
        listed = client.containers.list(
            all=True, sparse=True, filters={"label": f"{CASE_LABEL}={workload.case}"}
        )
        listed += client.containers.list(
            all=True, sparse=True, filters={"name": f"^{workload.name}$"}
        )
        for c in listed:
            name = str((c.attrs.get("Names") or ["?"])[0]).lstrip("/")
            state = str(c.attrs.get("State") or "")
            found[c.id] = Copy(h.name, c.id, name, state, process_states(h, c.id))
    return list(found.values())


def readings(container: Any) -> list[tuple[int, str]]:
    """(iteration, checksum) pairs the memhog printed, oldest first."""
    text = container.logs().decode(errors="replace")
    return [(int(m[1]), m[3]) for m in _READING.finditer(text)]


# ---------------------------------------------------------------- the checks


def _state_problems(copy: Copy, client: docker.DockerClient, workload: Workload) -> list[str]:
    series = readings(client.containers.get(copy.id))
    if not series:
        return [f"{copy.host}/{copy.name}: printed nothing yet"]
    bad = [s for _, s in series if s != workload.checksum]
    if bad:
        return [f"{copy.host}/{copy.name}: checksum {bad[0]} != {workload.checksum}: memory lost"]
    iters = [i for i, _ in series]
    if copy.id != workload.origin and iters[0] == 0:
        return [f"{copy.host}/{copy.name}: a copy that started from scratch (iteration 0)"]
    for a, b in itertools.pairwise(iters):
        if b <= a:
            return [f"{copy.host}/{copy.name}: iterations went back {a} -> {b}: it restarted"]
    if iters[-1] <= workload.last_iter:
        return [
            f"{copy.host}/{copy.name}: at iteration {iters[-1]}, not past {workload.last_iter} yet"
        ]
    return []


def _mid_of_checkpoint(name: str) -> str | None:
    m = _CKPT_MID.match(name)
    return m[1] if m else None


def leftover_problems(
    hosts: list[Host],
    clients: dict[str, docker.DockerClient],
    rows: list[JournalRow],
    since: float,
    keep: set[str],
) -> list[str]:
    """Leftovers of migrations that started at or after `since` (or of no known migration).

    `keep`: migration ids whose state must stay (in doubt, or failed with the
    checkpoint kept on purpose).
    """
    problems: list[str] = []
    known = {r.id for r in rows}
    mine = {r.id for r in rows if r.started >= since}

    def counts(mid: str | None) -> bool:
        return mid is None or mid not in known or (mid in mine and mid not in keep)

    problems += [
        f"a criu lazy-pages daemon of {mid} still runs (pid {pid})"
        for pid, mid in lazy_daemons(hosts, known)
        if counts(mid)
    ]
    for r in rows:
        if r.id in mine and r.outcome is None and r.id not in keep:
            problems.append(f"{r.host}: journal row {r.id} ({r.role}, {r.phase}) is unfinished")
    for h in hosts:
        root = Path(h.data_root)
        for ckpt in root.glob("containers/*/checkpoints/*"):
            if ckpt.name.startswith(".ferry-stage-"):
                problems.append(f"{h.name}: staging dir left: {ckpt}")
            elif ckpt.name.startswith("ferry-") and counts(_mid_of_checkpoint(ckpt.name)):
                problems.append(f"{h.name}: checkpoint dir left: {ckpt}")
        # Staging dirs sit beside their destination: overlay2/<layer>/, volumes/<name>/.
        problems += [f"{h.name}: staging dir left: {p}" for p in root.glob("*/*/.ferry-stage-*")]
        # Per-migration CRIU config, restore log, and the lazy restore's images and work dir.
        for item in root.glob("ferry/criu/*"):
            mids = [m for m in known if item.name.startswith(m)]
            if counts(mids[0] if mids else None):
                problems.append(f"{h.name}: CRIU file left: {item}")
        # The runc checkpointer's work dir, tmp/ferry-criu-<checkpoint name>.
        for work in root.glob("tmp/ferry-criu-*"):
            if counts(_mid_of_checkpoint(work.name.removeprefix("ferry-criu-"))):
                problems.append(f"{h.name}: CRIU work dir left: {work}")
        # Containers Ferry made on a target that neither run nor wait on a decision.
        made = {
            r.target_container: r.id
            for r in rows
            if r.host == h.name and r.role == "target" and r.target_container and counts(r.id)
        }
        for cid, mid in made.items():
            try:
                c = clients[h.name].containers.get(cid)
            except docker.errors.NotFound:
                continue
            states = process_states(h, c.id)
            stopped = c.status != "running" or (states and all(s in "Tt" for s in states))
            if stopped:
                problems.append(f"{h.name}: container {c.name} made by migration {mid} is stopped")
    return problems


def problems(
    hosts: list[Host],
    clients: dict[str, docker.DockerClient],
    workload: Workload,
    expect: Expect = "running",
) -> list[str]:
    """Everything that is wrong right now (empty when the invariants hold)."""
    rows = [r for h in hosts for r in journal_rows(h)]
    mine = {r.id for r in rows if r.started >= workload.since}
    doubtful = {r.id for r in rows if r.outcome == IN_DOUBT} & mine
    kept = {r.id for r in rows if r.outcome == "failed" and "checkpoint kept" in (r.reason or "")}
    found: list[str] = []
    all_copies = copies(hosts, clients, workload)
    running = [c for c in all_copies if c.running]
    stopped = [c for c in all_copies if c.stopped]
    if expect == "running":
        if len(running) != 1:
            found.append(f"{len(running)} running copies: {_describe(all_copies)}")
        elif stopped:
            found.append(f"stopped copies beside the running one: {_describe(stopped)}")
        else:
            found += _state_problems(running[0], clients[running[0].host], workload)
        if doubtful:
            found.append(f"migrations still in doubt: {sorted(doubtful)}")
    else:
        if running:
            found.append(f"in doubt, yet running: {_describe(running)}")
        if not stopped:
            found.append("in doubt, yet no stopped copy is left: the state is gone")
        if not doubtful:
            found.append("no migration is in doubt in any journal")
        roots = {h.name: Path(h.data_root) for h in hosts}
        for r in rows:
            # The source keeps every byte of state while in doubt.
            kept_state = roots[r.host].glob(f"containers/*/checkpoints/ferry-{r.id}*")
            if r.id in doubtful and r.role == "source" and not any(kept_state):
                found.append(f"{r.host}: in-doubt migration {r.id} lost its checkpoint")
    found += leftover_problems(hosts, clients, rows, workload.since, doubtful | kept)
    return found


def _describe(cs: Iterable[Copy]) -> str:
    def one(c: Copy) -> str:
        frozen = "/all T" if c.stopped and c.docker_status == "running" else ""
        return f"{c.host}/{c.name}[{c.docker_status}{frozen}]"

    return ", ".join(one(c) for c in cs) or "none"


def assert_invariants(
    hosts: list[Host],
    clients: dict[str, docker.DockerClient],
    workload: Workload,
    expect: Expect = "running",
    timeout: float = 90.0,
) -> Copy | None:
    """Wait until the invariants hold; fail with what is still wrong at the deadline.

    Returns the one running copy (expect="running"), with `workload.last_iter`
    moved on to what it printed, so later checks compare against it.
    """
    last: list[str] = []

    def holds() -> bool:
        nonlocal last
        try:
            last = problems(hosts, clients, workload, expect)
        except Exception as exc:  # a daemon restarting, a journal being written
            last = [f"cannot check: {exc!r}"]
        return not last

    try:
        wait_for(holds, timeout=timeout, interval=0.5, what=f"chaos invariants ({expect})")
    except DeadlineExceeded:
        raise AssertionError(
            f"after {timeout:.0f}s the invariants still fail ({expect}):\n  - "
            + "\n  - ".join(last)
        ) from None
    if expect != "running":
        return None
    (copy,) = [c for c in copies(hosts, clients, workload) if c.running]
    workload.last_iter = max(i for i, _ in readings(clients[copy.host].containers.get(copy.id)))
    return copy


def assert_retry_works(
    hosts: list[Host], clients: dict[str, docker.DockerClient], workload: Workload
) -> Copy:
    """A fresh `ferry migrate` to another host succeeds, and the state still continues."""
    here = assert_invariants(hosts, clients, workload)
    assert here is not None
    src = next(h for h in hosts if h.name == here.host)
    dst = next(h for h in hosts if h.name != here.host)
    rc, lines, err = ferry_migrate(src, workload.name, dst.name, timeout=180)
    assert rc == 0, f"retry {src.name} -> {dst.name} failed (exit {rc}): {err[-2000:]}"
    assert result_of(lines)["ok"], lines[-1]
    moved = assert_invariants(hosts, clients, workload)
    assert moved is not None and moved.host == dst.name, f"retry: it runs on {moved}"
    return moved


def check_all(
    hosts: list[Host], clients: dict[str, docker.DockerClient], workload: Workload
) -> None:
    """The end of every chaos test: the invariants hold, then a retry works."""
    assert_invariants(hosts, clients, workload)
    assert_retry_works(hosts, clients, workload)

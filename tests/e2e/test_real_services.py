"""Real software moves with its clients: Redis, PostgreSQL 17, SQLite, an outgoing connection.

Built from Debian's packages (tests/testbed/service_images.py), moved host1 ->
host2 by real agents with the default config (runc checkpointer: frozen in
place, dumped with tcp-established and file-locks; restored with tcp-close and
file-locks). Clients run in host3's network. Each test checks the data and that
the process is the same one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.migration_support import (
    Agents,
    Gate,
    container_or_none,
    engine_agents,
    ferry_migrate,
    migrate_in_background,
    result_of,
)
from tests.helpers import wait_for
from tests.testbed.layout import Host
from tests.testbed.procs import netns_argv
from tests.testbed.service_images import PG_BIN, SERVICES, ensure_service_image, pg_env

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
NAMES = ("svc-redis", "svc-pg", "svc-psql", "svc-sqlite", "svc-out")
REDIS_PORT = 16379
PG_PORT = 15432
ECHO_PORT = 17000
KEYS = 50_000
ROWS = 100_000


@pytest.fixture(scope="module")
def cluster(testbed_hosts: list[Host]) -> Iterator[tuple[list[Host], Agents]]:
    hosts = testbed_hosts[:3]
    ensure_service_image(hosts)
    with engine_agents(hosts[:2]) as agents:
        yield hosts, agents


@pytest.fixture
def cleanup(
    cluster: tuple[list[Host], Agents], docker_clients: dict[str, docker.DockerClient]
) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()
    for client in docker_clients.values():
        for name in NAMES:
            c = container_or_none(client, name)
            if c is not None:
                c.remove(force=True)


def _exec(container: Any, *cmd: str, env: dict[str, str] | None = None) -> str:
    rc, out = container.exec_run(list(cmd), environment=env)
    text = out.decode(errors="replace")
    assert rc == 0, f"{cmd} exited {rc}: {text}"
    return text.strip()


def _moved(h1: Host, h2: Host, name: str, clients: dict[str, docker.DockerClient]) -> Any:
    rc, lines, err = ferry_migrate(h1, name, h2.name)
    report = result_of(lines)["report"]
    assert rc == 0 and report["outcome"] == "succeeded", (rc, report, err)
    assert report["details"]["checkpoint_via"] == "runc"
    print(f"{name}: downtime {report['downtime_s']}s, phases {report['phases']}")
    assert container_or_none(clients[h1.name], name) is None, "source kept its copy"
    moved = clients[h2.name].containers.get(name)
    assert moved.status == "running" and moved.attrs["RestartCount"] == 0
    return moved


def _client_proc(
    host: Host, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.e2e.service_clients", *args]
    return subprocess.Popen(
        netns_argv(host, argv, env),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------- Redis


def _redis(container: Any, *args: str) -> str:
    return _exec(container, "redis-cli", *args)


def _acked(out: Path, i: int) -> list[int]:
    path = out / f"c{i}.acked"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_redis_with_three_connected_clients(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    (h1, h2, h3), _ = cluster
    redis = docker_clients[h1.name].containers.run(
        SERVICES,
        ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
         "--appendonly", "no"],
        name="svc-redis", detach=True, ports={"6379/tcp": REDIS_PORT},
        labels={"ferry.migrate": "true"},
    )  # fmt: skip
    wait_for(lambda: _redis(redis, "PING") == "PONG", timeout=30, what="redis to answer")
    fill = (
        f"python3 -c \"import sys; [sys.stdout.write(f'SET key:{{i}} v{{i}}\\n') "
        f'for i in range({KEYS})]" | redis-cli --pipe'
    )
    assert "errors: 0" in _exec(redis, "sh", "-c", fill)
    run_id = _redis(redis, "INFO", "server").split("run_id:")[1].split()[0]

    out = tmp_path / "redis"
    addrs = [f"{h1.ip}:{REDIS_PORT}", f"{h2.ip}:{REDIS_PORT}"]
    cleanup.append(_client_proc(h3, "redis", str(out), *addrs))
    wait_for(lambda: all(len(_acked(out, i)) >= 50 for i in range(3)), timeout=30,
             what="three clients writing")  # fmt: skip
    before = [len(_acked(out, i)) for i in range(3)]

    moved = _moved(h1, h2, "svc-redis", docker_clients)
    moved_at = time.time()
    # Every client notices, reconnects to the new address and writes on.
    wait_for(
        lambda: all(len(_acked(out, i)) > before[i] + 50 for i in range(3)),
        timeout=30,
        what="all three clients writing to the moved Redis",
    )
    (out / "stop").touch()
    events = (out / "events").read_text().splitlines()
    for i in range(3):
        assert any(f"c{i} connected {h2.ip}:{REDIS_PORT}" in e for e in events), events
    errors = [e for e in events if " error after " in e]
    print("client events:\n" + "\n".join(events))  # what clients saw, for the README
    assert errors and all(float(e.split()[0]) >= moved_at - 30 for e in errors)

    assert _redis(moved, "INFO", "server").split("run_id:")[1].split()[0] == run_id
    assert int(_redis(moved, "DBSIZE")) == KEYS + 3
    sample = [f"key:{i}" for i in range(0, KEYS, 997)]
    assert _redis(moved, "MGET", *sample).split() == [f"v{i}" for i in range(0, KEYS, 997)]
    for i in range(3):
        stored = {int(x) for x in _redis(moved, "SMEMBERS", f"c{i}").split()}
        lost = set(_acked(out, i)) - stored
        assert not lost, (
            f"client c{i}: acknowledged writes missing after the move: {sorted(lost)[:10]}"
        )


# ---------------------------------------------------------------- PostgreSQL


def _psql_here(pg: Any, sql: str) -> str:
    return _exec(pg, f"{PG_BIN}/psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", sql)


def _psql_from(client: Any, host: Host, sql: str) -> str:
    return _exec(
        client,
        f"{PG_BIN}/psql", "-h", host.ip, "-p", str(PG_PORT), "-U", "postgres", "-tAc", sql,
    )  # fmt: skip


def test_postgres_with_an_idle_session(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: list[subprocess.Popen[str]],
) -> None:
    (h1, h2, h3), _ = cluster
    pg = docker_clients[h1.name].containers.run(
        SERVICES, [f"{PG_BIN}/postgres", "-D", "/var/lib/pg", "-k", "/tmp"], environment=pg_env(),
        name="svc-pg", detach=True, ports={"5432/tcp": PG_PORT},
        labels={"ferry.migrate": "true"},
    )  # fmt: skip
    wait_for(lambda: _psql_here(pg, "SELECT 1") == "1", timeout=60, what="postgres to answer")
    _psql_here(
        pg,
        f"CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, {ROWS}) g",
    )
    started = _psql_here(pg, "SELECT pg_postmaster_start_time()")
    digest = _psql_here(pg, "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t")

    client = docker_clients[h3.name].containers.run(
        SERVICES, ["sleep", "infinity"], name="svc-psql", detach=True
    )
    # The idle pooled session: connected, one query answered, then quiet.
    conninfo = f"host={h1.ip} port={PG_PORT} user=postgres tcp_user_timeout=3000"
    session = subprocess.Popen(
        ["docker", "-H", h3.docker_host, "exec", "-i", "svc-psql",
         f"{PG_BIN}/psql", conninfo, "-tA"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    cleanup.append(session)
    assert session.stdin
    session.stdin.write("SELECT 'idle-ready';\n")
    session.stdin.flush()
    idle = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle' "
        "AND client_addr IS NOT NULL AND client_addr <> '127.0.0.1'"
    )
    wait_for(lambda: _psql_here(pg, idle) == "1", timeout=30, what="the idle session")

    moved = _moved(h1, h2, "svc-pg", docker_clients)

    # The old session learns its server is gone: an error, not a hang, not an answer.
    out, err = session.communicate("SELECT count(*) FROM t;\n", timeout=60)
    assert "idle-ready" in out and str(ROWS) not in out, (out, err)
    assert "connection" in err and ("lost" in err or "closed" in err), err
    print(f"idle session saw: {err.strip()}")

    assert _psql_from(client, h2, "SELECT pg_postmaster_start_time()") == started
    assert _psql_from(client, h2, "SELECT count(*) FROM t") == str(ROWS)
    assert _psql_from(client, h2, "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t") == digest
    _psql_from(client, h2, "INSERT INTO t VALUES (0, 'after the move')")
    assert _psql_here(moved, "SELECT v FROM t WHERE id = 0") == "after the move"


# ---------------------------------------------------------------- outgoing connection


def _lines(out: Path) -> list[tuple[str, str, int]]:
    path = out / "lines"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], parts[1], int(parts[2])))
    return rows


def test_outgoing_connection_to_another_host(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    (h1, h2, h3), _ = cluster
    out = tmp_path / "echo"
    cleanup.append(_client_proc(h3, "echo", str(out), str(ECHO_PORT)))
    wait_for(lambda: (out / "ready").exists(), timeout=10, what="echo server")
    docker_clients[h1.name].containers.run(
        SERVICES, ["python3", "/usr/local/bin/conn_client.py", h3.ip, str(ECHO_PORT)],
        name="svc-out", detach=True, labels={"ferry.migrate": "true"},
    )  # fmt: skip
    first = wait_for(lambda: (r := _lines(out)) and len(r) >= 10 and r, timeout=30,
                     what="the container's connection to host3")  # fmt: skip
    peer, token, _ = first[0]
    assert peer == h1.ip

    moved = _moved(h1, h2, "svc-out", docker_clients)
    before = max(n for _, _, n in _lines(out))
    after = wait_for(
        lambda: [r for r in _lines(out) if r[0] == h2.ip and r[2] > before + 5],
        timeout=30,
        what="the same process to reconnect from host2",
    )
    assert {t for _, t, _ in _lines(out)} == {token}, "a fresh process connected"
    assert all(t == token for _, t, _ in after)
    assert "start token" not in moved.logs().decode(), "it started afresh on the target"


# ---------------------------------------------------------------- SQLite


def _sqlite(container: Any, sql: str) -> str:
    return _exec(container, "sqlite3", "/srv/writer/w.db", sql)


def _locks_of_pid1(container: Any) -> list[str]:
    """/proc/locks lines of the writer (PID 1 in its container), as `TYPE inode-number`."""
    text = _exec(container, "cat", "/proc/locks")
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 6 and f[4] == "1":
            out.append(f"{f[1]} {f[5].rsplit(':', 1)[1]}")
    return out


def _inode(container: Any, path: str) -> str:
    return _exec(container, "stat", "-c", "%i", path)


def _wal_size(container: Any) -> int:
    return int(_exec(container, "stat", "-c", "%s", "/srv/writer/w.db-wal"))


def _check_copy(container: Any, dest: Path) -> tuple[str, int, int]:
    """integrity_check, row count and max(n) of a copy of the stopped writer's files."""
    import io
    import sqlite3
    import tarfile

    stream, _ = container.get_archive("/srv/writer")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        tar.extractall(dest, filter="data")
    db = sqlite3.connect(dest / "writer" / "w.db")
    try:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        count, top = db.execute("SELECT count(*), max(n) FROM t").fetchone()
    finally:
        db.close()
    return ok, count, top


def test_sqlite_wal_writer_with_held_locks(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    (h1, h2, _), _ = cluster
    writer = docker_clients[h1.name].containers.run(
        SERVICES, ["python3", "/usr/local/bin/sqlite_writer.py"],
        name="svc-sqlite", detach=True, labels={"ferry.migrate": "true"},
    )  # fmt: skip
    # Watched through the WAL's size, not a second SQLite connection (see the README:
    # a second connection on the target could reset the writer's shared-memory index).
    wait_for(lambda: _wal_size(writer) > 50_000, timeout=30, what="the writer to write")
    db_inode = _inode(writer, "/srv/writer/w.db")
    guard_inode = _inode(writer, "/srv/writer/writer.lock")
    held = _locks_of_pid1(writer)
    assert f"FLOCK {guard_inode}" in held and f"POSIX {db_inode}" in held, held

    moved = _moved(h1, h2, "svc-sqlite", docker_clients)
    grown = _wal_size(moved)
    wait_for(lambda: _wal_size(moved) > grown + 20_000, timeout=30,
             what="the writer to carry on on the target")  # fmt: skip
    # Restored with its flock and its POSIX lock on the database (file-locks on both
    # sides; without it CRIU would drop them silently).
    held_after = _locks_of_pid1(moved)
    db_inode = _inode(moved, "/srv/writer/w.db")
    guard_inode = _inode(moved, "/srv/writer/writer.lock")
    assert f"FLOCK {guard_inode}" in held_after, held_after
    assert f"POSIX {db_inode}" in held_after, held_after
    moved.reload()
    assert moved.status == "running" and "start token" not in moved.logs().decode()

    moved.stop(timeout=5)
    ok, count, top = _check_copy(moved, tmp_path)
    assert ok == "ok"
    assert count == top, "a number was skipped or written twice"
    print(f"sqlite: {top} rows, integrity {ok}")


# ---------------------------------------------------------------- rollback


def test_rollback_after_the_freeze_keeps_connections(
    cluster: tuple[list[Host], Agents],
    docker_clients: dict[str, docker.DockerClient],
    cleanup: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    (h1, h2, h3), agents = cluster
    redis = docker_clients[h1.name].containers.run(
        SERVICES, ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"],
        name="svc-redis", detach=True, ports={"6379/tcp": REDIS_PORT},
        labels={"ferry.migrate": "true"},
    )  # fmt: skip
    wait_for(lambda: _redis(redis, "PING") == "PONG", timeout=30, what="redis to answer")
    run_id = _redis(redis, "INFO", "server").split("run_id:")[1].split()[0]
    out = tmp_path / "redis"
    # Patient clients: the freeze below is held open for as long as the test needs.
    patient = {"FERRY_CLIENT_TIMEOUT": "120"}
    cleanup.append(_client_proc(h3, "redis", str(out), f"{h1.ip}:{REDIS_PORT}", env=patient))
    wait_for(lambda: all(len(_acked(out, i)) >= 20 for i in range(3)), timeout=30,
             what="three clients writing")  # fmt: skip

    try:
        with Gate(h1, "after-freeze") as gate:
            cli = migrate_in_background(h1, "svc-redis", h2.name)
            gate.wait()
            assert docker_clients[h1.name].containers.get("svc-redis").status == "paused"
            agents.stop(h2, signal.SIGTERM)  # the target goes away: the transfer fails
        stdout, err = cli.communicate(timeout=300)
    finally:
        if not h2.agent_pid:
            agents.start(h2)
    assert cli.returncode == 1, err
    report = result_of([json.loads(x) for x in stdout.splitlines() if x.startswith("{")])
    assert report["rolled_back"], report
    assert report["report"]["details"]["rollback"].startswith("resumed in place")
    before = [len(_acked(out, i)) for i in range(3)]
    wait_for(lambda: all(len(_acked(out, i)) > before[i] + 20 for i in range(3)), timeout=30,
             what="the clients to carry on")  # fmt: skip
    (out / "stop").touch()
    events = (out / "events").read_text()
    # The same connections carried on after a stall: no client saw an error.
    assert " error after " not in events, events
    assert events.count(" connected ") == 3, events
    after = docker_clients[h1.name].containers.get("svc-redis")
    assert after.status == "running" and after.attrs["RestartCount"] == 0
    assert _redis(after, "INFO", "server").split("run_id:")[1].split()[0] == run_id
    for i in range(3):
        stored = {int(x) for x in _redis(after, "SMEMBERS", f"c{i}").split()}
        assert set(_acked(out, i)) <= stored

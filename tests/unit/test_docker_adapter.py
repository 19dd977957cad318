"""DockerAdapter against a fake Engine over loopback HTTP: real URLs, real SDK plumbing."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from agent.docker_adapter import (
    CheckpointError,
    DockerAdapter,
    DockerConflict,
    DockerNotFound,
    DockerUnavailable,
)
from tests.helpers import wait_for

API = "1.45"


class FakeEngine:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, list[str]], bytes]] = []
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stop = threading.Event()
        self.events_open = threading.Event()
        self.checkpoints: dict[str, list[str]] = {"c1": []}
        self.fail_restore = False
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                engine.requests.append((method, url.path, query, body))
                path = url.path.removeprefix(f"/v{API}")
                if path == "/version":
                    return self._reply(200, {"ApiVersion": API, "Version": "26.1.5"})
                if path == "/info":
                    return self._reply(200, {"DockerRootDir": "/var/lib/docker"})
                if path == "/events":
                    return self._events()
                parts = path.strip("/").split("/")
                if parts[0] == "containers" and len(parts) >= 2:
                    cid = parts[1]
                    if cid not in engine.checkpoints:
                        return self._reply(404, {"message": f"No such container: {cid}"})
                    if parts[2:] == ["checkpoints"] and method == "POST":
                        name = json.loads(body)["CheckpointID"]
                        if name in engine.checkpoints[cid]:
                            return self._reply(500, {"message": "checkpoint already exists"})
                        engine.checkpoints[cid].append(name)
                        return self._reply(201)
                    if parts[2:] == ["checkpoints"]:
                        return self._reply(200, [{"Name": n} for n in engine.checkpoints[cid]])
                    if parts[2:3] == ["checkpoints"] and method == "DELETE":
                        engine.checkpoints[cid].remove(parts[3])
                        return self._reply(204)
                    if parts[2:] == ["start"]:
                        if engine.fail_restore and query.get("checkpoint"):
                            return self._reply(500, {"message": "criu failed: type RESTORE"})
                        return self._reply(204)
                    if parts[2:] == ["update"]:
                        return self._reply(200, {"Warnings": []})
                    if parts[2:] == ["stop"]:
                        return self._reply(409, {"message": "container is paused"})
                return self._reply(404, {"message": "page not found"})

            def _events(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                engine.events_open.set()
                while not engine.stop.is_set():
                    try:
                        ev = engine.events.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if ev is None:
                        break
                    data = json.dumps(ev).encode() + b"\n"
                    try:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    except OSError:
                        return
                with contextlib.suppress(OSError):
                    self.wfile.write(b"0\r\n\r\n")

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-engine")

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.server.server_address[1]}"

    def paths(self) -> list[tuple[str, str]]:
        return [(m, p.removeprefix(f"/v{API}")) for m, p, _, _ in self.requests]


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    eng = FakeEngine()
    eng.thread.start()
    yield eng
    eng.stop.set()
    eng.server.shutdown()
    eng.server.server_close()
    eng.thread.join(5)


@pytest.fixture
def adapter(engine: FakeEngine) -> Iterator[DockerAdapter]:
    a = DockerAdapter(engine.url, timeout=5)
    yield a
    a.close()


def test_checkpoint_create_list_delete_use_engine_endpoints(
    adapter: DockerAdapter, engine: FakeEngine
) -> None:
    adapter.checkpoint_create("c1", "ferry-abc", exit=True)
    assert adapter.checkpoint_list("c1") == ["ferry-abc"]
    adapter.checkpoint_delete("c1", "ferry-abc")
    assert adapter.checkpoint_list("c1") == []
    method, path, _, body = engine.requests[1]
    assert (method, path) == ("POST", f"/v{API}/containers/c1/checkpoints")
    assert json.loads(body) == {"CheckpointID": "ferry-abc", "Exit": True}
    assert ("DELETE", "/containers/c1/checkpoints/ferry-abc") in engine.paths()


def test_checkpoint_name_is_validated_before_any_call(adapter: DockerAdapter) -> None:
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        adapter.checkpoint_create("c1", "x")


def test_start_from_checkpoint_passes_name_and_maps_failure(
    adapter: DockerAdapter, engine: FakeEngine
) -> None:
    adapter.start("c1", checkpoint="ferry-1")
    _, path, query, _ = engine.requests[-1]
    assert path.endswith("/containers/c1/start") and query == {"checkpoint": ["ferry-1"]}
    engine.fail_restore = True
    with pytest.raises(CheckpointError, match="criu failed"):
        adapter.start("c1", checkpoint="ferry-1")


def test_errors_map_to_ferry_types(adapter: DockerAdapter, engine: FakeEngine) -> None:
    with pytest.raises(DockerNotFound, match="No such container: nope"):
        adapter.inspect_container("nope")
    assert adapter.find_container("nope") is None
    with pytest.raises(DockerConflict, match="paused"):
        adapter.stop("c1")
    with pytest.raises(CheckpointError, match="already exists"):
        adapter.checkpoint_create("c1", "dup1")
        adapter.checkpoint_create("c1", "dup1")


def test_unreachable_daemon_is_unavailable() -> None:
    a = DockerAdapter("unix:///nonexistent/ferry-test.sock", timeout=1)
    with pytest.raises(DockerUnavailable):
        a.info()


def test_update_restart_policy_body(adapter: DockerAdapter, engine: FakeEngine) -> None:
    adapter.update_restart_policy("c1", {"Name": "", "MaximumRetryCount": 0})
    _, path, _, body = engine.requests[-1]
    assert path.endswith("/containers/c1/update")
    assert json.loads(body) == {"RestartPolicy": {"Name": "no", "MaximumRetryCount": 0}}


def test_data_root_from_info(adapter: DockerAdapter) -> None:
    assert adapter.data_root() == "/var/lib/docker"


def test_events_decode_filter_and_close_wakes_blocked_reader(
    adapter: DockerAdapter, engine: FakeEngine
) -> None:
    stream = adapter.events(since=1700000000.5)
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(stream), name="events-reader")
    reader.start()
    engine.events.put({"Type": "container", "Action": "start", "id": "c1"})
    wait_for(lambda: got, timeout=5, what="first event")
    stream.close()  # the reader is blocked waiting for the next chunk
    reader.join(5)
    assert not reader.is_alive()
    assert got == [{"Type": "container", "Action": "start", "id": "c1"}]
    _, _, query, _ = next(r for r in engine.requests if r[1].endswith("/events"))
    assert query["since"] == ["1700000000.500000000"]
    assert json.loads(query["filters"][0]) == {"type": ["container"]}

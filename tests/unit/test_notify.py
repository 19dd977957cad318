"""sd_notify against a real datagram socket bound by the test."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service.notify import Notifier


@pytest.fixture
def dgram_path() -> Iterator[tuple[socket.socket, str]]:
    # tmp_path can exceed the 108-byte sun_path limit; a short dir under /tmp cannot.
    with tempfile.TemporaryDirectory(prefix="fn") as d:
        path = str(Path(d) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        try:
            yield sock, path
        finally:
            sock.close()


def _recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_noop_without_notify_socket() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.ready("x") is False


def test_ready_status_stopping_on_path_socket(dgram_path: tuple[socket.socket, str]) -> None:
    sock, path = dgram_path
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert n.ready("serving")
        msg = _recv(sock)
        assert msg["READY"] == "1"
        assert msg["STATUS"] == "serving"
        assert msg["MAINPID"] == str(os.getpid())
        assert n.status("draining:\n2 left")
        assert _recv(sock) == {"STATUS": "draining: 2 left"}
        assert n.stopping()
        assert _recv(sock) == {"STOPPING": "1"}
    finally:
        n.close()


def test_abstract_socket() -> None:
    name = f"ferry-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.watchdog()
        assert _recv(sock) == {"WATCHDOG": "1"}
    finally:
        n.close()
        sock.close()


def test_send_failure_is_not_raised() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/dir/notify.sock"})
    try:
        assert n.enabled
        assert n.ready() is False
    finally:
        n.close()


def test_watchdog_interval_is_half_and_respects_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    other_pid = str(os.getpid() + 1)
    assert Notifier.from_env({**env, "WATCHDOG_PID": other_pid}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval is None
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None

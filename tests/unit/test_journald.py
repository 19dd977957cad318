"""The journald native-protocol sender, against a real datagram socket standing in for journald."""

from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent import journald
from agent.journald import JournalSender, connected_to_journal, encode, event_fields, field_name
from agent.logging import configure_logging


def decode(data: bytes) -> dict[str, str]:
    """journald's side of the protocol: `NAME=value\\n` or `NAME\\n<u64 len><value>\\n`."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            pos = nl + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    yield path, server
    server.close()


def receive(server: socket.socket) -> dict[str, str]:
    """One entry, from a datagram or from a memfd passed with it (big entries)."""
    fds = array.array("i")
    data, ancdata, _, _ = server.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not fds:
        return decode(data)
    (fd,) = fds
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        assert seals & want == want, "journald refuses a memfd that can still change"
        assert data == b""
        return decode(os.pread(fd, os.fstat(fd).st_size, 0))
    finally:
        os.close(fd)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    root.setLevel(level)
    root.handlers[:] = handlers


def test_field_names_are_what_journald_accepts() -> None:
    assert field_name("migration") == "MIGRATION"
    assert field_name("bytes-sent.total") == "BYTES_SENT_TOTAL"
    assert field_name("_private") == "PRIVATE"  # leading _ is for journald's trusted fields
    assert field_name("2fa") == "F_2FA"
    # A key journald gives its own meaning keeps its value under another name.
    assert field_name("message") == "FERRY_MESSAGE"
    assert field_name("priority") == "FERRY_PRIORITY"
    assert len(field_name("x" * 100)) == 64


def test_event_fields_one_field_per_key_and_a_readable_message() -> None:
    fields = event_fields(
        {
            "event": "migration.started",
            "migration": "m-1",
            "container": "web",
            "peers": ["a", "b"],
            "ok": True,
            "level": "warning",
            "timestamp": "2026-12-01T00:00:00Z",
            "message": "careful",
        }
    )
    assert fields["EVENT"] == "migration.started"
    assert fields["MIGRATION"] == "m-1" and fields["CONTAINER"] == "web"
    assert fields["PEERS"] == '["a","b"]' and fields["OK"] == "true"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "ferry"
    assert fields["FERRY_MESSAGE"] == "careful"
    assert "TIMESTAMP" not in fields and "LEVEL" not in fields  # journald stamps its own
    assert fields["MESSAGE"].startswith("migration.started migration=m-1 container=web")
    assert not fields["MESSAGE"].lstrip().startswith("{")


def test_encode_is_binary_safe_for_multiline_values() -> None:
    fields = {"MESSAGE": "boom", "EXCEPTION": "Traceback\n  line 1\nValueError: x=1"}
    data = encode(fields)
    assert b"EXCEPTION\n" + struct.pack("<Q", len(fields["EXCEPTION"])) in data
    assert decode(data) == fields


def test_sender_delivers_one_datagram_per_entry(journal_socket: tuple[str, socket.socket]) -> None:
    path, server = journal_socket
    sender = JournalSender(path)
    sender.send({"MESSAGE": "hello", "EVENT": "agent.ready", "TRACE": "a\nb"})
    sender.send({"MESSAGE": "second"})
    assert receive(server) == {"MESSAGE": "hello", "EVENT": "agent.ready", "TRACE": "a\nb"}
    assert receive(server) == {"MESSAGE": "second"}
    sender.close()


def test_sender_passes_entries_too_big_for_a_datagram_in_a_sealed_memfd(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, server = journal_socket
    big = "x" * (4 << 20)  # beyond any unix datagram size limit
    JournalSender(path).send({"MESSAGE": "big", "BLOB": big})
    got = receive(server)
    assert got["MESSAGE"] == "big" and got["BLOB"] == big


def test_sender_raises_when_there_is_no_journald(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        JournalSender(str(tmp_path / "absent.sock")).send({"MESSAGE": "x"})


def test_connected_only_when_journal_stream_names_this_fd(tmp_path: Path) -> None:
    target = tmp_path / "stream"
    target.write_text("")
    with target.open("w") as fh:
        st = os.fstat(fh.fileno())
        assert connected_to_journal([fh.fileno()], {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        other = f"{st.st_dev}:{st.st_ino + 1}"
        assert not connected_to_journal([fh.fileno()], {"JOURNAL_STREAM": other})
        assert not connected_to_journal([fh.fileno()], {"JOURNAL_STREAM": "garbage"})
        assert not connected_to_journal([fh.fileno()], {})


def _journal_env(monkeypatch: pytest.MonkeyPatch, stream: io.TextIOBase) -> None:
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_auto_format_sends_structured_fields_under_systemd(
    journal_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    restore_logging: None,
) -> None:
    path, server = journal_socket
    monkeypatch.setattr(journald, "SOCKET_PATH", path)
    with (tmp_path / "stdout").open("w") as out:
        _journal_env(monkeypatch, out)
        configure_logging("info", "auto", stream=out)
        log = structlog.get_logger("t")
        log.debug("too.quiet")
        log.info("migration.started", migration="m-7", container="db")
        logging.getLogger("aiohttp.access").warning("library says %s", "hi")
        out.flush()
        assert (tmp_path / "stdout").read_text() == ""  # nothing as plain text
    entry = receive(server)
    assert entry["EVENT"] == "migration.started"
    assert entry["MIGRATION"] == "m-7" and entry["CONTAINER"] == "db"
    assert entry["PRIORITY"] == "6"
    library = receive(server)
    assert library["MESSAGE"].startswith("library says hi")
    assert library["LOGGER"] == "aiohttp.access" and library["PRIORITY"] == "4"


def test_journal_unreachable_falls_back_to_json_on_the_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, restore_logging: None
) -> None:
    monkeypatch.setattr(journald, "SOCKET_PATH", str(tmp_path / "gone.sock"))
    with (tmp_path / "stdout").open("w") as out:
        _journal_env(monkeypatch, out)
        configure_logging("info", "auto", stream=out)
        structlog.get_logger("t").info("agent.ready", host="h1")
    (line,) = (tmp_path / "stdout").read_text().splitlines()
    assert json.loads(line)["EVENT"] == "agent.ready"


def test_not_under_systemd_keeps_json(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger("t").info("agent.ready", host="h1")
    assert json.loads(out.getvalue())["event"] == "agent.ready"

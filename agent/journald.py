"""Structured log records to systemd-journald over its native protocol.

Under systemd the agent's stdout is a journal stream, where every line lands
in MESSAGE and `journalctl -o json` shows a JSON blob inside a string. Sent
natively, each key of a log event (event, migration, container, ...) becomes
a journal field of its own (EVENT=, MIGRATION=, CONTAINER=), so
`journalctl -u ferry MIGRATION=<id>` finds one migration.

Written against the protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) rather than
the `systemd-python` binding, which needs libsystemd headers to build:
- one datagram per entry on /run/systemd/journal/socket;
- a field is `NAME=value\\n`, or, when the value holds a newline,
  `NAME\\n` + its length as a little-endian u64 + the value + `\\n`;
- an entry too big for a datagram goes in a sealed memfd passed with SCM_RIGHTS.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Any

SOCKET_PATH = "/run/systemd/journal/socket"
IDENTIFIER = "ferry"

# syslog(3) priorities, which journald keeps in PRIORITY=.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
# Fields journald or journalctl give a meaning of their own: an event key of
# the same name (e.g. `message=`) is kept under FERRY_<NAME> instead.
RESERVED = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "SYSLOG_FACILITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "SYSLOG_RAW",
        "DOCUMENTATION",
        "TID",
        "UNIT",
        "USER_UNIT",
        "OBJECT_PID",
    }
)
# Keys the native entry carries in another form: journald stamps its own time,
# and the level becomes PRIORITY.
DROPPED = frozenset({"timestamp", "level"})
_INVALID = re.compile(r"[^A-Z0-9_]")
MAX_FIELD_NAME = 64


def field_name(key: str) -> str:
    """A journal field name for an event key: [A-Z0-9_], not starting with _ or a digit."""
    name = _INVALID.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = f"F_{name}"
    if name in RESERVED:
        name = f"FERRY_{name}"
    return name[:MAX_FIELD_NAME]


def field_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, separators=(",", ":"))


def event_fields(event: Mapping[str, Any], method: str = "info") -> dict[str, str]:
    """The journal entry for one structlog event dict."""
    level = str(event.get("level") or method).lower()
    name = str(event.get("event", ""))
    fields = {
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "EVENT": name,
    }
    shown = []
    for key, value in event.items():
        if key in DROPPED or key == "event":
            continue
        text = field_value(value)
        fields[field_name(key)] = text
        if "\n" not in text:
            shown.append(f"{key}={text}")
    # MESSAGE stays readable for plain `journalctl -u ferry`; the fields above
    # are what tools filter on.
    fields["MESSAGE"] = " ".join([name, *shown])
    return fields


def encode(fields: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    items = fields.items() if isinstance(fields, Mapping) else fields
    out = bytearray()
    for name, value in items:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def connected_to_journal(fds: Iterable[int], env: Mapping[str, str] | None = None) -> bool:
    """Is one of these fds the journal stream systemd gave us (per $JOURNAL_STREAM)?"""
    raw = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = raw.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == int(dev) and st.st_ino == int(ino):
            return True
    return False


class JournalSender:
    """Sends entries to journald; `send` raises OSError when it cannot (caller falls back)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or SOCKET_PATH
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def send(self, fields: Mapping[str, str]) -> None:
        data = encode(fields)
        sock = self._socket()
        try:
            sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, data)

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        # journald only accepts a memfd that can no longer change under it.
        fd = os.memfd_create("ferry-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd]).tobytes()
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

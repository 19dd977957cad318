"""sd_notify client: READY, STATUS, WATCHDOG and STOPPING over `$NOTIFY_SOCKET`.

Written against the protocol (a datagram per message on a unix socket) rather
than a binding so it needs no C library. When Ferry is not started by systemd
the environment has no NOTIFY_SOCKET and every call is a cheap no-op.

The watchdog is pinged from the asyncio loop that does the real work (see
`watchdog_loop`), never from a helper thread: if the loop hangs the pings stop
and systemd restarts the agent, which is the point of `WatchdogSec=`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


def _socket_address(raw: str) -> str | None:
    """Turn NOTIFY_SOCKET into an address for `sendto`.

    `@name` is an abstract socket (leading NUL); an absolute path is a file.
    Anything else (e.g. vsock:...) is not something we can speak to.
    """
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("notify.watchdog_usec_invalid", value=raw)
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    # systemd sets WATCHDOG_PID so a child that inherited the environment does
    # not ping on the parent's behalf.
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return usec / 1_000_000 / 2


class Notifier:
    """Talks to the service manager; every method is safe to call when not under systemd."""

    def __init__(self, socket_path: str | None, watchdog_interval: float | None = None) -> None:
        self._address = _socket_address(socket_path) if socket_path else None
        if socket_path and self._address is None:
            log.warning("notify.socket_unsupported", notify_socket=socket_path)
        self.watchdog_interval = watchdog_interval if self._address else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification, e.g. send(READY=1, STATUS="serving").

        Failures are logged, never raised: a lost status line must not take the
        agent down, and systemd itself treats notifications as best-effort.
        """
        if self._address is None:
            return False
        # Newlines would split one field into two assignments.
        message = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("notify.send_failed", error=str(exc), fields=sorted(fields))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

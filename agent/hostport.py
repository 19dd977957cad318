"""`host:port` addresses as the config writes them, split in one place.

Forms: ``10.0.0.7:7443``, ``[fd00::7]:7443`` (IPv6 in brackets) and, where a
listener allows it, ``:9464`` for all interfaces.
"""

from __future__ import annotations


def _split(value: str) -> tuple[str, str]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, got {value!r}")
    return host, port


def check_host_port(value: str) -> str:
    """The config's rule for an address: a host, brackets around IPv6, a port 1-65535."""
    host, port = _split(value)
    if not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if any(c.isspace() for c in value):
        raise ValueError(f"whitespace in address {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"bad IPv6 address in {value!r}; write [addr]:port")
    elif ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: [addr]:port, got {value!r}")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """(host without brackets, port); the host is "" for ``:port``.

    Lenient on purpose: it serves addresses the config already checked, and
    tests that bind port 0.
    """
    host, port = _split(value)
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)

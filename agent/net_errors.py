"""One-line reasons for failed connections, for people rather than for debuggers.

aiohttp's exceptions print as reprs of connection keys and SSL contexts; what a
person needs is what failed: "connection refused", "timed out", "TLS
verification failed: certificate has expired". `describe` finds that down the
cause chain; `unreachable_line` adds who and where, in the form the CLI,
`ferry status` and the logs all use:

    peer node-b at 10.0.0.2:7443: connection refused
    agent at /run/ferry/ferry.sock: connection refused (is `ferry run` running?)
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import aiohttp

from agent.errors import one_line

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.ENOENT: "no such socket",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EPIPE: "connection closed while sending",
    errno.EADDRNOTAVAIL: "address not available",
}


def _os_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _one(exc: BaseException) -> str | None:
    """The reason this exception alone gives, or None to look further down the chain."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        detail = getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or cert
        return f"TLS verification failed: {detail}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS handshake failed: {getattr(exc.os_error, 'reason', None) or exc.os_error}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _os_error(exc.os_error)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".strip()
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return _os_error(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_error(exc)
    return None


def describe(exc: BaseException) -> str:
    """What failed, in a few words, from the first exception in the chain that says."""
    seen: BaseException | None = exc
    hops = 0
    while seen is not None and hops < 10:
        found = _one(seen)
        if found is not None:
            return one_line(found)
        seen = seen.__cause__ or seen.__context__
        hops += 1
    return one_line(str(exc) or type(exc).__name__)


def unreachable_line(who: str, where: str | None, reason: str) -> str:
    """'peer node-b at 10.0.0.2:7443: connection refused': who, where, what failed."""
    place = f" at {where}" if where else ""
    return one_line(f"{who}{place}: {reason}")

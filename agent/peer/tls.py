"""Mutual TLS for the peer channel.

Both directions authenticate: the server demands a client certificate signed by
the cluster CA, and the client verifies the server against the same CA. A
peer's identity is its certificate's CN / DNS SANs, and each side checks that
identity against the peer name it expects, not against an address.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.peer.certs import cert_names

log = structlog.get_logger(__name__)

# web.RequestKey (typed request storage) arrived in aiohttp 3.14; distributions
# ship older ones (Debian trixie: 3.11), where a plain string key does the same.
PEER_NAME_KEY: Any = (
    web.RequestKey("ferry_peer_name", str) if hasattr(web, "RequestKey") else "ferry_peer_name"
)


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The peer presented a valid cluster certificate, but for another name.

    An SSLError subclass so that, raised inside the handshake, asyncio fails the
    connection like any other verification failure.
    """


def peer_names(peercert: dict[str, Any] | None) -> set[str]:
    """CN and DNS SANs from `SSLSocket.getpeercert()`'s dict form."""
    if not peercert:
        return set()
    names: set[str] = set()
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return names


def check_peer_name(peercert: dict[str, Any] | None, expected: str) -> None:
    names = peer_names(peercert)
    if expected not in names:
        shown = ", ".join(sorted(names)) or "no name"
        raise PeerIdentityError(f"peer certificate is for {shown}, expected {expected!r}")


class _PeerNameCheckingSSLObject(ssl.SSLObject):
    """Checks the server's certificate name right after the handshake.

    asyncio creates one of these per connection (SSLContext.sslobject_class),
    so the check runs before a single byte of the request is sent. The expected
    name arrives as `server_hostname`, which PeerClient sets to the peer's name.
    """

    def do_handshake(self) -> None:
        super().do_handshake()
        expected = self.server_hostname
        if not expected:
            raise PeerIdentityError("no expected peer name given for this connection")
        check_peer_name(self.getpeercert(), expected)


def _base_context(purpose: int, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Server side: a client certificate signed by the cluster CA is mandatory."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Client side: present our certificate, verify the server against the cluster CA.

    OpenSSL's hostname check compares the cert with the address we dial, and
    peers are dialled by IP (the testbed has no DNS for them) while certificates
    name hosts. So that check is off, and instead the server's CN/DNS SAN must
    equal the configured peer *name*, checked in code right after the handshake
    (see _PeerNameCheckingSSLObject). Chain verification against the CA stays on.

    That check lives in the SSLObject asyncio uses, so use this context with
    asyncio/aiohttp (PeerClient), not with blocking sockets.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslobject_class = _PeerNameCheckingSSLObject
    return ctx


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_identity_middleware(allowed_peers: Collection[str]) -> Any:
    """aiohttp middleware: only configured peers get past the headers.

    Runs before any handler, so the body of a refused request is never read.
    The authenticated name is stored as request[PEER_NAME_KEY].
    """
    # A set is kept as given, not copied: the fleet adds the hosts it discovers to it.
    allowed = (
        allowed_peers if isinstance(allowed_peers, set | frozenset) else frozenset(allowed_peers)
    )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        names = peer_names(peercert)
        matches = sorted(names & allowed)
        if not matches:
            reason = (
                "no client certificate"
                if not names
                else f"certificate name {', '.join(sorted(names))} is not a configured peer"
            )
            log.warning("peer.refused", reason=reason, path=request.path)
            resp = web.json_response({"error": "forbidden", "reason": reason}, status=403)
            resp.force_close()  # do not read (or linger over) a stranger's body
            return resp
        request[PEER_NAME_KEY] = matches[0]
        return await handler(request)

    return middleware


def _load_cert(path: Path, what: str, problems: list[str]) -> x509.Certificate | None:
    if not path.is_file():
        problems.append(f"{what} {path} does not exist")
        return None
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, OSError) as exc:
        problems.append(f"{what} {path} is not a PEM certificate: {exc}")
        return None


def check_tls_files(
    ca: Path,
    cert: Path,
    key: Path,
    *,
    host_name: str | None = None,
    now: dt.datetime | None = None,
) -> list[str]:
    """Prerequisite check of the TLS files; returns problems, empty when all is well.

    `host_name` defaults to this machine's host name; pass the configured agent
    name when it differs.
    """
    problems: list[str] = []
    now = now or dt.datetime.now(dt.UTC)
    ca_cert = _load_cert(ca, "CA certificate", problems)
    host_cert = _load_cert(cert, "certificate", problems)

    for c, what, path in ((ca_cert, "CA certificate", ca), (host_cert, "certificate", cert)):
        if c is None:
            continue
        if c.not_valid_after_utc < now:
            problems.append(f"{what} {path} expired on {c.not_valid_after_utc:%Y-%m-%d}")
        elif c.not_valid_before_utc > now:
            problems.append(f"{what} {path} is not valid before {c.not_valid_before_utc}")

    if ca_cert is not None and host_cert is not None:
        try:
            host_cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            problems.append(f"certificate {cert} is not signed by the CA in {ca}")

    if not key.is_file():
        problems.append(f"key {key} does not exist")
    else:
        try:
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            problems.append(f"key {key} cannot be loaded: {exc}")
        else:
            if key.stat().st_mode & 0o077:
                problems.append(f"key {key} is readable by others; chmod 600 it")
            if host_cert is not None and _public_bytes(private.public_key()) != _public_bytes(
                host_cert.public_key()
            ):
                problems.append(f"key {key} does not match certificate {cert}")

    if host_cert is not None:
        expected = host_name or socket.gethostname()
        names = cert_names(host_cert)
        if expected not in names:
            problems.append(
                f"certificate {cert} names {', '.join(sorted(names)) or 'nothing'}, "
                f"not this host {expected!r}"
            )
    return problems


def _public_bytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data

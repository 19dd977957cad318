"""A small cluster CA and host certificates for the mutual-TLS peer channel.

Every agent gets one certificate that it uses both as a TLS server (targets)
and as a TLS client (sources), so host certs carry serverAuth and clientAuth.
The peer's identity is the certificate's CN, repeated as a DNS SAN because
TLS name checks only look at SANs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_HOST_DAYS = 825

# Host names become file names and certificate names: keep them plain.
_HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class CertError(Exception):
    """A certificate operation cannot proceed; the message says why."""


class CertExistsError(CertError):
    pass


class CaMissingError(CertError):
    pass


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


def ca_paths(directory: Path) -> CertPaths:
    return CertPaths(directory / CA_CERT_NAME, directory / CA_KEY_NAME)


def host_paths(directory: Path, host: str) -> CertPaths:
    return CertPaths(directory / f"{host}.crt", directory / f"{host}.key")


def validate_host_name(host: str) -> str:
    if not _HOST_RE.match(host) or ".." in host:
        raise CertError(
            f"invalid host name {host!r}: use letters, digits, '-' and '.' (a DNS-style name)"
        )
    return host


def _refuse_existing(paths: CertPaths, force: bool, what: str) -> None:
    existing = [p for p in (paths.cert, paths.key) if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise CertExistsError(f"{what} already exists ({names}); pass --force to overwrite it")


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start so the key is never readable by others,
    # and fix the mode of a file we overwrite.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(
    directory: Path,
    *,
    name: str = "ferry cluster CA",
    days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> CertPaths:
    """Create the cluster CA key and self-signed certificate in `directory`."""
    paths = ca_paths(directory)
    _refuse_existing(paths, force, "a CA")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(directory)
    missing = [str(p) for p in (paths.cert, paths.key) if not p.exists()]
    if missing:
        raise CaMissingError(
            f"no CA in {directory} (missing {', '.join(missing)}); run `ferry certs init` first"
        )
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{paths.key} is not an EC private key")
    return cert, key


def issue_host_cert(
    directory: Path,
    host: str,
    *,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = DEFAULT_HOST_DAYS,
    force: bool = False,
) -> CertPaths:
    """Issue `host`'s cert (CN=host, SAN DNS:host + extras), signed by the CA in `directory`."""
    validate_host_name(host)
    try:
        ip_addrs = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise CertError(f"invalid --ip: {exc}") from None
    for name in dns:
        validate_host_name(name)
    paths = host_paths(directory, host)
    _refuse_existing(paths, force, f"a certificate for {host}")
    ca_cert, ca_key = load_ca(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    dns_names = list(dict.fromkeys([host, *dns]))
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    san += [x509.IPAddress(ip) for ip in ip_addrs]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


# Where an agent looks by default: <state_dir>/tls/ (see agent.config.TLSConfig).
INSTALLED_NAMES = CertPaths(Path("cert.pem"), Path("key.pem"))
INSTALLED_CA = Path("ca.pem")


def install_host_files(
    directory: Path, host: str, dest: Path, *, force: bool = False
) -> list[Path]:
    """Copy the CA cert and `host`'s pair to dest/{ca,cert,key}.pem, the agent's defaults."""
    validate_host_name(host)
    src = host_paths(directory, host)
    ca = ca_paths(directory).cert
    missing = [str(p) for p in (ca, src.cert, src.key) if not p.exists()]
    if missing:
        raise CaMissingError(f"missing {', '.join(missing)}; run `ferry certs init/issue` first")
    targets = [dest / INSTALLED_CA, dest / INSTALLED_NAMES.cert, dest / INSTALLED_NAMES.key]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise CertExistsError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    dest.mkdir(parents=True, exist_ok=True)
    _write_public(targets[0], ca.read_bytes())
    _write_public(targets[1], src.cert.read_bytes())
    _write_private(targets[2], src.key.read_bytes())
    return targets


def cert_names(cert: x509.Certificate) -> set[str]:
    """The identities a certificate claims: its CN(s) and DNS SANs."""
    names = {str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    names.update(san.get_values_for_type(x509.DNSName))
    return names

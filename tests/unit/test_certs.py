"""Cluster CA and host certificates, and the TLS file prerequisite check."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.peer import certs
from agent.peer.tls import check_tls_files


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs.init_ca(d)
    return d


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_is_a_ca_and_key_is_private(ca_dir: Path) -> None:
    paths = certs.ca_paths(ca_dir)
    cert = _load(paths.cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    cert.verify_directly_issued_by(cert)


def test_host_cert_names_usage_and_signature(ca_dir: Path) -> None:
    paths = certs.issue_host_cert(ca_dir, "host-a", ips=("10.1.2.3",), dns=("a.example.test",))
    cert = _load(paths.cert)
    assert certs.cert_names(cert) == {"host-a", "a.example.test"}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(_load(certs.ca_paths(ca_dir).cert))
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert check_tls_files(ca_dir / "ca.crt", paths.cert, paths.key, host_name="host-a") == []


def test_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = certs.ca_paths(ca_dir).cert.read_bytes()
    with pytest.raises(certs.CertExistsError, match="--force"):
        certs.init_ca(ca_dir)
    assert certs.ca_paths(ca_dir).cert.read_bytes() == before
    certs.init_ca(ca_dir, force=True)
    assert certs.ca_paths(ca_dir).cert.read_bytes() != before

    certs.issue_host_cert(ca_dir, "h")
    with pytest.raises(certs.CertExistsError, match="--force"):
        certs.issue_host_cert(ca_dir, "h")
    certs.issue_host_cert(ca_dir, "h", force=True)


def test_issue_without_ca_and_bad_names(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(certs.CaMissingError, match="certs init"):
        certs.issue_host_cert(tmp_path / "empty", "h")
    for bad in ("../evil", "a/b", "", "-x", "a..b"):
        with pytest.raises(certs.CertError, match="invalid host name"):
            certs.issue_host_cert(ca_dir, bad)
    with pytest.raises(certs.CertError, match="invalid --ip"):
        certs.issue_host_cert(ca_dir, "h", ips=("999.1.1.1",))


def test_check_tls_files_reports_each_problem(tmp_path: Path, ca_dir: Path) -> None:
    h = certs.issue_host_cert(ca_dir, "h1")
    other_ca = tmp_path / "other"
    certs.init_ca(other_ca)
    ca = ca_dir / "ca.crt"

    missing = check_tls_files(tmp_path / "nope.crt", h.cert, tmp_path / "nope.key", host_name="h1")
    assert any("nope.crt does not exist" in p for p in missing)
    assert any("nope.key does not exist" in p for p in missing)

    wrong_ca = check_tls_files(other_ca / "ca.crt", h.cert, h.key, host_name="h1")
    assert wrong_ca == [f"certificate {h.cert} is not signed by the CA in {other_ca / 'ca.crt'}"]

    wrong_key = check_tls_files(ca, h.cert, ca_dir / "ca.key", host_name="h1")
    assert wrong_key == [f"key {ca_dir / 'ca.key'} does not match certificate {h.cert}"]

    wrong_name = check_tls_files(ca, h.cert, h.key, host_name="h2")
    assert len(wrong_name) == 1 and "not this host 'h2'" in wrong_name[0]

    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=certs.DEFAULT_HOST_DAYS + 1)
    expired = check_tls_files(ca, h.cert, h.key, host_name="h1", now=future)
    assert any(p.startswith(f"certificate {h.cert} expired on") for p in expired)

    h.key.chmod(0o644)
    assert check_tls_files(ca, h.cert, h.key, host_name="h1") == [
        f"key {h.key} is readable by others; chmod 600 it"
    ]

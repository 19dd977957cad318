"""`ferry certs`: the cluster CA and host certificates for the peer channel."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from agent.cli import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, main
from agent.peer import certs as certlib
from agent.peer.tls import check_tls_files

_DIR = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding ca.crt/ca.key and the host certificates.",
)
_FORCE = click.option("--force", is_flag=True, help="Overwrite existing files.")


@main.group("certs")
def certs() -> None:
    """Manage the cluster CA and host certificates (mutual TLS between agents)."""


@certs.command("init")
@_DIR
@_FORCE
@click.option("--name", default="ferry cluster CA", show_default=True, help="CA common name.")
@click.option("--days", default=certlib.DEFAULT_CA_DAYS, show_default=True, type=click.IntRange(1))
def init_cmd(directory: Path, force: bool, name: str, days: int) -> None:
    """Create the cluster CA (EC P-256) in DIR."""
    try:
        paths = certlib.init_ca(directory, name=name, days=days, force=force)
    except certlib.CertError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"CA certificate: {paths.cert}")
    click.echo(f"CA key:         {paths.key} (0600; keep it off the hosts if you can)")


@certs.command("issue")
@click.argument("host")
@_DIR
@click.option("--ip", "ips", multiple=True, help="Extra IP address SAN (repeatable).")
@click.option("--dns", "dns", multiple=True, help="Extra DNS name SAN (repeatable).")
@click.option(
    "--days", default=certlib.DEFAULT_HOST_DAYS, show_default=True, type=click.IntRange(1)
)
@_FORCE
def issue_cmd(
    host: str, directory: Path, ips: tuple[str, ...], dns: tuple[str, ...], days: int, force: bool
) -> None:
    """Issue HOST's certificate (CN=HOST), for both serving and calling peers."""
    try:
        paths = certlib.issue_host_cert(directory, host, ips=ips, dns=dns, days=days, force=force)
    except certlib.CaMissingError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except certlib.CertError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"certificate: {paths.cert}")
    click.echo(f"key:         {paths.key} (0600)")


@certs.command("install")
@click.argument("host")
@_DIR
@click.option(
    "--to",
    "dest",
    default=Path("/var/lib/ferry/tls"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The agent's <state_dir>/tls, where it looks for ca.pem, cert.pem and key.pem.",
)
@_FORCE
def install_cmd(host: str, directory: Path, dest: Path, force: bool) -> None:
    """Copy the CA and HOST's certificate and key to where the agent looks by default."""
    try:
        written = certlib.install_host_files(directory, host, dest, force=force)
    except certlib.CaMissingError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except certlib.CertError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    for path in written:
        click.echo(f"wrote {path}")


@certs.command("check")
@click.option("--ca", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--cert", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Expected certificate name (default: host name).")
def check_cmd(ca: Path, cert: Path, key: Path, name: str | None) -> None:
    """Check that CA, certificate and key are usable together by this host."""
    problems = check_tls_files(ca, cert, key, host_name=name)
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        raise SystemExit(EXIT_UNAVAILABLE)
    click.echo("TLS files OK")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)

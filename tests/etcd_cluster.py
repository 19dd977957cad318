"""A real etcd cluster (Debian's etcd 3.5) with TLS for tests: on loopback, or one
member per testbed host network namespace.

Members are plain processes; tests kill, stop and restart them to take away a
member or the quorum. Every address is loopback or a testbed host's own.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.peer.certs import ca_paths, host_paths, init_ca, issue_host_cert
from tests.helpers import wait_for
from tests.testbed.etcd_pkg import etcd_binary


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    ip: str
    client_port: int
    peer_port: int
    prefix: list[str] = field(default_factory=list)  # e.g. nsenter into a host's netns
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.client_port}"


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


class EtcdCluster:
    """`members` as (ip, netns-prefix) pairs; TLS for clients and peers from one CA."""

    def __init__(self, where: Sequence[tuple[str, Sequence[str]]], root: Path | None = None):
        self.root = root or Path(tempfile.mkdtemp(prefix="ferry-etcd-"))
        self.binary = etcd_binary()
        self.members = [
            Member(f"etcd{i + 1}", ip, free_port(ip) if not pre else 2379, 0, list(pre))
            for i, (ip, pre) in enumerate(where)
        ]
        for m in self.members:
            m.peer_port = free_port(m.ip) if not m.prefix else 2380
        certs = self.root / "certs"
        init_ca(certs)
        for m in self.members:
            issue_host_cert(certs, m.name, ips=(m.ip,))
        issue_host_cert(certs, "client")
        client = host_paths(certs, "client")
        self.tls = Tls(ca_paths(certs).cert, client.cert, client.key)
        self._certs = certs

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _argv(self, m: Member, state: str) -> list[str]:
        paths = host_paths(self._certs, m.name)
        cluster = ",".join(f"{x.name}=https://{x.ip}:{x.peer_port}" for x in self.members)
        ca = str(ca_paths(self._certs).cert)
        return [
            *m.prefix,
            str(self.binary),
            f"--name={m.name}",
            f"--data-dir={self.root / m.name}",
            f"--listen-client-urls=https://{m.ip}:{m.client_port}",
            f"--advertise-client-urls=https://{m.ip}:{m.client_port}",
            f"--listen-peer-urls=https://{m.ip}:{m.peer_port}",
            f"--initial-advertise-peer-urls=https://{m.ip}:{m.peer_port}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-state={state}",
            "--initial-cluster-token=ferry-test",
            "--client-cert-auth",
            f"--trusted-ca-file={ca}",
            f"--cert-file={paths.cert}",
            f"--key-file={paths.key}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={ca}",
            f"--peer-cert-file={paths.cert}",
            f"--peer-key-file={paths.key}",
            # A small test cluster on a loaded 2-core machine: quick elections, no fsync waits.
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--unsafe-no-fsync",
            "--log-level=error",
        ]

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            self._spawn(m, "new")
        try:
            wait_for(self.healthy, timeout, 0.2, "etcd cluster to elect a leader")
        except BaseException:
            logs = {m.name: (self.root / f"{m.name}.log").read_text()[-1500:] for m in self.members}
            self.stop()
            raise AssertionError(f"etcd did not come up: {logs}") from None

    def _spawn(self, m: Member, state: str) -> None:
        log = open(self.root / f"{m.name}.log", "ab")  # noqa: SIM115 - the process owns it
        m.proc = subprocess.Popen(
            self._argv(m, state), stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()

    def healthy(self, member: Member | None = None) -> bool:
        """A linearizable read answered: there is a leader and a quorum."""
        import etcd3gw

        from agent.fleet.etcd import tls_session

        targets = [member] if member else [m for m in self.members if self.running(m)]
        for m in targets:
            if m.prefix:
                # Only reachable from inside the testbed's network: ask from there.
                probe = subprocess.run(
                    [*m.prefix, sys.executable, "-m", "tests.etcd_cluster", m.endpoint,
                     str(self.tls.ca), str(self.tls.cert), str(self.tls.key)],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )  # fmt: skip
                if probe.returncode == 0:
                    return True
                continue
            client = etcd3gw.client(
                host=m.ip,
                port=m.client_port,
                protocol="https",
                session=tls_session(self.tls.ca, self.tls.cert, self.tls.key),
                timeout=1.0,
                api_path="/v3/",
            )
            try:
                client.get("health-probe")
                return True
            except Exception:
                continue
            finally:
                client.session.close()
        return False

    def running(self, m: Member) -> bool:
        return m.proc is not None and m.proc.poll() is None

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def restart(self, m: Member) -> None:
        self.kill(m)
        self._spawn(m, "existing")

    def stop(self) -> None:
        for m in self.members:
            self.kill(m)
        shutil.rmtree(self.root, ignore_errors=True)


def loopback_cluster(size: int = 1) -> EtcdCluster:
    return EtcdCluster([("127.0.0.1", ())] * size)


__all__ = ["EtcdCluster", "Member", "loopback_cluster"]


def _probe(endpoint: str, ca: str, cert: str, key: str) -> int:
    """Exit 0 when a linearizable read at `endpoint` answers (run inside a host's netns)."""
    import etcd3gw

    from agent.fleet.etcd import tls_session

    host, _, port = endpoint.rpartition(":")
    client = etcd3gw.client(
        host=host,
        port=int(port),
        protocol="https",
        session=tls_session(Path(ca), Path(cert), Path(key)),
        timeout=1.0,
        api_path="/v3/",
    )
    try:
        client.get("health-probe")
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_probe(*sys.argv[1:5]))

"""A real etcd (Debian's 3.5, TLS) on loopback for the fleet tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from agent.fleet.etcd import Etcd
from tests.etcd_cluster import EtcdCluster, loopback_cluster


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    cluster = loopback_cluster(1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:8]}/"


def client(cluster: EtcdCluster, timeout: float = 2.0) -> Etcd:
    tls = cluster.tls
    return Etcd(cluster.endpoints, ca=tls.ca, cert=tls.cert, key=tls.key, timeout=timeout)

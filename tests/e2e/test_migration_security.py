"""The peer API on the testbed refuses strangers and hostile archives, writing nothing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.migration.spec import spec_from_inspect
from agent.peer.certs import init_ca, issue_host_cert
from tests.e2e.migration_support import COUNTER, container_or_none, engine_agents, history
from tests.testbed import netns_run
from tests.testbed.agents import CERT_DIR
from tests.testbed.layout import AGENT_PORT, Host

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]


@pytest.fixture(scope="module")
def agents(testbed_hosts: list[Host]) -> Iterator[list[Host]]:
    hosts = testbed_hosts[:2]
    with engine_agents(hosts):
        yield hosts


def _probe(host: Host, tmp: Path, request: dict[str, Any]) -> dict[str, Any]:
    path = tmp / f"probe-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(request))
    proc = netns_run(host, [sys.executable, "-m", "tests.e2e.peer_probe", str(path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_clients_without_a_valid_certificate_are_refused(
    agents: list[Host], tmp_path: Path
) -> None:
    h1, h2 = agents
    address = f"{h2.ip}:{AGENT_PORT}"
    ca = str(CERT_DIR / "ca.crt")
    good = _probe(
        h1,
        tmp_path,
        {
            "mode": "health",
            "address": address,
            "ca": ca,
            "cert": str(CERT_DIR / "host1.crt"),
            "key": str(CERT_DIR / "host1.key"),
        },
    )
    assert good["status"] == 200, good  # the probe itself works with a real peer's cert

    no_cert = _probe(h1, tmp_path, {"mode": "health", "address": address, "ca": ca})
    assert no_cert["status"] is None, no_cert

    # A certificate named like a real peer but issued by another CA.
    rogue = tmp_path / "rogue"
    init_ca(rogue)
    issue_host_cert(rogue, "host1", ips=(h1.ip,))
    forged = _probe(
        h1,
        tmp_path,
        {
            "mode": "health",
            "address": address,
            "ca": ca,
            "cert": str(rogue / "host1.crt"),
            "key": str(rogue / "host1.key"),
        },
    )
    assert forged["status"] is None, forged

    # Signed by the cluster CA, but not a configured peer.
    cluster_ca = tmp_path / "cluster-ca"
    cluster_ca.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(CERT_DIR / name, cluster_ca / name)
    issue_host_cert(cluster_ca, "mallory", ips=(h1.ip,))
    stranger = _probe(
        h1,
        tmp_path,
        {
            "mode": "health",
            "address": address,
            "ca": ca,
            "cert": str(cluster_ca / "mallory.crt"),
            "key": str(cluster_ca / "mallory.key"),
        },
    )
    assert stranger["status"] == 403, stranger


def test_archive_escaping_its_directory_is_refused_and_writes_nothing(
    agents: list[Host], docker_clients: dict[str, docker.DockerClient], tmp_path: Path
) -> None:
    h1, h2 = agents
    c1 = docker_clients[h1.name]
    src = c1.containers.run(COUNTER, name="mig-sec-src", detach=True)
    try:
        spec = spec_from_inspect(src.attrs | c1.api.inspect_container(src.id)).to_dict()
        spec["name"] = "mig-sec-victim"
        mid = f"e2e-sec-{secrets.token_hex(4)}"
        escape = f"ferry-escape-{secrets.token_hex(4)}"
        out = _probe(
            h1,
            tmp_path,
            {
                "mode": "bad-archive",
                "address": f"{h2.ip}:{AGENT_PORT}",
                "target_name": h2.name,
                "ca": str(CERT_DIR / "ca.crt"),
                "cert": str(CERT_DIR / "host1.crt"),
                "key": str(CERT_DIR / "host1.key"),
                "migration_id": mid,
                "spec": spec,
                "escape_name": escape,
            },
        )
    finally:
        src.remove(force=True)
    assert out["prepare"]["accepted"], out
    cid = out["stage"]["container_id"]
    # Refused as it arrives (before any restore call), with the reason.
    refused = out.get("state_refused")
    assert refused and refused["status"] == 422 and refused["error"] == "unsafe_archive", out
    assert ".." in refused["reason"]
    assert out["status"]["outcome"] == "aborted"
    # The half-made container went with it, and nothing landed anywhere near.
    assert container_or_none(docker_clients[h2.name], "mig-sec-victim") is None
    assert not (Path(h2.data_root) / "containers" / cid).exists()
    for root in (Path(h2.data_root), Path(h2.state_dir), Path(h2.host_dir)):
        for dirpath, dirs, files in os.walk(root):
            assert escape not in files and escape not in dirs, f"{escape} written in {dirpath}"
    (rec,) = history(h2, mid)
    assert rec.outcome == "aborted" and ".." in (rec.reason or "")

"""inspect -> create translation, and what is refused before anything is touched."""

from __future__ import annotations

import copy
from typing import Any

from agent.migration.paths import DataRoot, PathOutsideDataRoot
from agent.migration.spec import ContainerSpec, source_problems, spec_from_inspect

CID = "a" * 64

INSPECT: dict[str, Any] = {
    "Id": CID,
    "Name": "/web",
    "Image": "sha256:" + "b" * 64,
    "State": {"Status": "running", "Running": True, "Paused": False},
    "Config": {
        "Hostname": CID[:12],
        "User": "1000:1000",
        "Env": ["A=1", "PATH=/bin"],
        "Cmd": ["/counter", "--fast"],
        "Entrypoint": ["/init"],
        "WorkingDir": "/srv",
        "Labels": {"ferry.evacuate": "true"},
        "Image": "ferry-test/counter:1",
        "ExposedPorts": {"8080/tcp": {}},
        "Healthcheck": {"Test": ["CMD", "/check"], "Interval": 1000000000},
        "StopSignal": "SIGINT",
    },
    "HostConfig": {
        "PortBindings": {"8080/tcp": [{"HostIp": "", "HostPort": "18080"}]},
        "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
        "Memory": 268435456,
        "NanoCpus": 500000000,
        "PidsLimit": 100,
        "NetworkMode": "appnet",
        "AutoRemove": False,
        "Binds": ["/srv/data:/data:ro"],
        "CapAdd": None,
        "Tmpfs": {"/run": "size=1m"},
    },
    "Mounts": [
        {
            "Type": "bind",
            "Source": "/srv/data",
            "Destination": "/data",
            "RW": False,
            "Propagation": "rprivate",
        },
        {
            "Type": "volume",
            "Name": "cache",
            "Source": "/var/lib/docker/volumes/cache/_data",
            "Destination": "/cache",
            "Driver": "local",
            "RW": True,
        },
    ],
    "NetworkSettings": {
        "Networks": {"appnet": {"Aliases": [CID[:12], "web", "www"], "IPAddress": "172.18.0.5"}}
    },
    "GraphDriver": {
        "Name": "overlay2",
        "Data": {"UpperDir": "/var/lib/docker/overlay2/xyz/diff"},
    },
}


def test_create_body_keeps_what_the_process_sees() -> None:
    spec = spec_from_inspect(INSPECT)
    body = spec.body
    assert spec.name == "web" and spec.id == CID
    assert body["Image"] == "ferry-test/counter:1"
    assert spec.image_id == "sha256:" + "b" * 64
    assert body["Cmd"] == ["/counter", "--fast"] and body["Entrypoint"] == ["/init"]
    assert body["Env"] == ["A=1", "PATH=/bin"]
    assert body["User"] == "1000:1000" and body["WorkingDir"] == "/srv"
    assert body["Labels"] == {"ferry.evacuate": "true"}
    assert body["Healthcheck"]["Test"] == ["CMD", "/check"] and spec.has_healthcheck
    assert body["Hostname"] == CID[:12]  # the restored UTS namespace expects it
    host = body["HostConfig"]
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "", "HostPort": "18080"}]}
    assert host["Memory"] == 268435456 and host["NanoCpus"] == 500000000
    assert host["PidsLimit"] == 100 and host["Tmpfs"] == {"/run": "size=1m"}
    assert "CapAdd" not in host  # empty values are left to the target's defaults


def test_restart_policy_is_held_back_until_restored() -> None:
    spec = spec_from_inspect(INSPECT)
    assert spec.body["HostConfig"]["RestartPolicy"] == {"Name": "no", "MaximumRetryCount": 0}
    assert spec.restart_policy == {"Name": "unless-stopped", "MaximumRetryCount": 0}


def test_mounts_become_explicit_so_missing_bind_sources_fail_at_create() -> None:
    spec = spec_from_inspect(INSPECT)
    mounts = spec.body["HostConfig"]["Mounts"]
    assert {
        "Type": "bind",
        "Source": "/srv/data",
        "Target": "/data",
        "ReadOnly": True,
        "BindOptions": {"Propagation": "rprivate"},
    } in mounts
    assert {"Type": "volume", "Source": "cache", "Target": "/cache", "ReadOnly": False} in mounts
    assert "Binds" not in spec.body["HostConfig"]
    assert [(b.source, b.destination, b.read_only) for b in spec.binds] == [
        ("/srv/data", "/data", True)
    ]
    (vol,) = spec.volumes
    assert (vol.name, vol.anonymous, vol.daemon_path) == (
        "cache",
        False,
        "/var/lib/docker/volumes/cache/_data",
    )


def test_networks_by_name_with_aliases_but_not_the_old_short_id() -> None:
    spec = spec_from_inspect(INSPECT)
    assert spec.networks == ["appnet"]
    assert spec.body["NetworkingConfig"] == {
        "EndpointsConfig": {"appnet": {"Aliases": ["web", "www"]}}
    }
    assert spec.ports[0].host_port == 18080 and spec.ports[0].container_port == "8080/tcp"


def test_spec_round_trips_through_json_shape() -> None:
    spec = spec_from_inspect(INSPECT)
    again = ContainerSpec.from_dict(copy.deepcopy(spec.to_dict()))
    assert again == spec


def test_source_problems() -> None:
    spec = spec_from_inspect(INSPECT)
    assert source_problems(INSPECT, spec, copy_named_volumes=True) == []
    (why,) = source_problems(INSPECT, spec, copy_named_volumes=False)
    assert "volume cache" in why and "copy_named_volumes" in why

    bad = copy.deepcopy(INSPECT)
    bad["State"] = {"Status": "exited", "Running": False}
    bad["HostConfig"]["AutoRemove"] = True
    bad["HostConfig"]["NetworkMode"] = "container:other"
    bad["GraphDriver"] = {"Name": "vfs", "Data": {}}
    problems = " | ".join(source_problems(bad, spec_from_inspect(bad), True))
    for needle in ("not running", "--rm", "container:other", "overlay2"):
        assert needle in problems


def test_daemon_paths_map_into_the_configured_data_root(tmp_path: Any) -> None:
    root = DataRoot("/var/lib/docker", tmp_path)
    assert root.local("/var/lib/docker/overlay2/x/diff") == tmp_path / "overlay2/x/diff"
    assert root.checkpoint_dir("c1", "ferry-1") == tmp_path / "containers/c1/checkpoints/ferry-1"
    for outside in ("/var/lib/dockerx/a", "/etc/passwd", "/var/lib/docker/../../etc"):
        try:
            root.local(outside)
        except PathOutsideDataRoot:
            continue
        raise AssertionError(f"{outside} was mapped")


def test_static_address_mac_and_tmpfs_options_are_carried() -> None:
    pinned = copy.deepcopy(INSPECT)
    pinned["Config"]["MacAddress"] = "02:42:ac:1f:46:99"
    pinned["NetworkSettings"]["Networks"]["appnet"]["IPAMConfig"] = {"IPv4Address": "10.9.0.7"}
    pinned["HostConfig"]["Mounts"] = [
        {"Type": "tmpfs", "Target": "/scratch", "TmpfsOptions": {"SizeBytes": 4096, "Mode": 1016}}
    ]
    pinned["Mounts"].append({"Type": "tmpfs", "Destination": "/scratch", "RW": True})
    spec = spec_from_inspect(pinned)
    endpoint = spec.body["NetworkingConfig"]["EndpointsConfig"]["appnet"]
    assert endpoint["IPAMConfig"] == {"IPv4Address": "10.9.0.7"}
    assert endpoint["MacAddress"] == "02:42:ac:1f:46:99"
    assert spec.addresses == {"appnet": {"IPv4Address": "10.9.0.7"}}
    assert spec.mac_address == "02:42:ac:1f:46:99"
    assert {
        "Type": "tmpfs",
        "Target": "/scratch",
        "ReadOnly": False,
        "TmpfsOptions": {"SizeBytes": 4096, "Mode": 1016},
    } in spec.body["HostConfig"]["Mounts"]
    # Docker's own address and MAC are not pinned: the target picks its own.
    plain = spec_from_inspect(INSPECT)
    assert plain.addresses == {} and "IPAMConfig" not in str(plain.body)


def test_init_and_links_are_refused_with_the_reason() -> None:
    bad = copy.deepcopy(INSPECT)
    bad["HostConfig"]["Init"] = True
    bad["HostConfig"]["Links"] = ["/db:/web/db", "/cache:/web/cache"]
    spec = spec_from_inspect(bad)
    problems = source_problems(bad, spec, copy_named_volumes=True)
    assert any("--init: docker-init as PID 1 does not restore here" in p for p in problems)
    assert any("--link to db, cache" in p for p in problems)

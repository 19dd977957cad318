"""migration.accept: what a target refuses to create for a peer, and what an operator may allow."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from agent.config import AcceptConfig
from agent.migration.accept import DaemonFacts, SpecShapeError, check_spec, parse_spec
from agent.migration.spec import ContainerSpec, spec_from_inspect

IMAGE = "sha256:" + "ab" * 32


def inspect(**host: Any) -> dict[str, Any]:
    """Inspect data of a plain running container, with HostConfig overrides."""
    return {
        "Id": "c" * 64,
        "Name": "/app",
        "Image": IMAGE,
        "State": {"Running": True},
        "Config": {"Image": "app:1", "Cmd": ["/app"], "Env": ["A=1"], "Labels": {"x": "y"}},
        "HostConfig": {
            "NetworkMode": "bridge",
            "RestartPolicy": {"Name": "always"},
            "CgroupnsMode": "private",
            "IpcMode": "private",
            "LogConfig": {"Type": "json-file", "Config": {}},
            "CapDrop": ["NET_RAW"],
            "Memory": 1 << 28,
            **host,
        },
        "Mounts": [],
        "NetworkSettings": {"Networks": {"bridge": {}}},
        "GraphDriver": {"Name": "overlay2", "Data": {"UpperDir": "/var/lib/docker/x/diff"}},
    }


def reasons(spec: ContainerSpec, cgroup: str = "2", **accept: Any) -> list[str]:
    return check_spec(spec, AcceptConfig(**accept), DaemonFacts(cgroup_version=cgroup))


def with_host(**host: Any) -> ContainerSpec:
    spec = spec_from_inspect(inspect())
    spec.body["HostConfig"].update(host)
    return spec


def test_a_plain_container_is_accepted_as_the_source_describes_it() -> None:
    spec = spec_from_inspect(inspect(CapAdd=["CHOWN", "cap_kill"]))
    assert reasons(spec) == []


@pytest.mark.parametrize(
    ("host", "field", "allow"),
    [
        ({"Privileged": True}, "HostConfig.Privileged", {"privileged": True}),
        ({"PidMode": "host"}, "HostConfig.PidMode", {"host_namespaces": ["pid"]}),
        ({"IpcMode": "host"}, "HostConfig.IpcMode", {"host_namespaces": ["ipc"]}),
        ({"UTSMode": "host"}, "HostConfig.UTSMode", {"host_namespaces": ["uts"]}),
        ({"NetworkMode": "host"}, "HostConfig.NetworkMode", {"host_namespaces": ["network"]}),
        ({"UsernsMode": "host"}, "HostConfig.UsernsMode", {"host_namespaces": ["userns"]}),
        ({"CgroupnsMode": "host"}, "HostConfig.CgroupnsMode", {"host_namespaces": ["cgroup"]}),
        ({"CapAdd": ["SYS_ADMIN"]}, "HostConfig.CapAdd", {"capabilities": ["SYS_ADMIN"]}),
        ({"CapAdd": ["CAP_NET_ADMIN"]}, "HostConfig.CapAdd", {"capabilities": ["net_admin"]}),
        ({"CapAdd": ["ALL"]}, "HostConfig.CapAdd", {"capabilities": ["ALL"]}),
        (
            {"Devices": [{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem"}]},
            "HostConfig.Devices",
            {"devices": ["/dev/mem"]},
        ),
        (
            {"DeviceRequests": [{"Driver": "nvidia", "Count": -1}]},
            "HostConfig.DeviceRequests",
            {"device_requests": True},
        ),
        (
            {"DeviceCgroupRules": ["c 1:1 rwm"]},
            "HostConfig.DeviceCgroupRules",
            {"device_cgroup_rules": ["c 1:1 rwm"]},
        ),
        (
            {"SecurityOpt": ["seccomp=unconfined"]},
            "HostConfig.SecurityOpt",
            {"security_opts": ["seccomp=unconfined"]},
        ),
        (
            {"SecurityOpt": ["apparmor=unconfined"]},
            "HostConfig.SecurityOpt",
            {"security_opts": ["apparmor=unconfined"]},
        ),
        (
            {"Sysctls": {"net.ipv4.ip_forward": "1"}},
            "HostConfig.Sysctls",
            {"sysctls": ["net.ipv4.ip_forward"]},
        ),
        ({"MaskedPaths": []}, "HostConfig.MaskedPaths", {"unmask_system_paths": True}),
        ({"ReadonlyPaths": []}, "HostConfig.ReadonlyPaths", {"unmask_system_paths": True}),
        (
            {"LogConfig": {"Type": "syslog", "Config": {}}},
            "HostConfig.LogConfig",
            {"log_drivers": ["syslog"]},
        ),
        (
            {"Annotations": {"org.criu.config": "/srv/evil.conf"}},
            "HostConfig.Annotations",
            {"annotations": ["org.criu.config"]},
        ),
    ],
)
def test_each_privilege_is_refused_by_default_and_allowed_by_its_key(
    host: dict[str, Any], field: str, allow: dict[str, Any]
) -> None:
    spec = with_host(**host)
    (reason,) = reasons(spec)
    assert reason.startswith(field), reason
    key = next(iter(allow))
    assert f"migration.accept.{key}" in reason, "the refusal names the key that would allow it"
    assert "\n" not in reason
    assert reasons(spec, **allow) == []


def test_cgroup_host_namespace_is_dockers_default_on_cgroup_v1() -> None:
    spec = with_host(CgroupnsMode="host")
    assert reasons(spec, cgroup="1") == []
    assert reasons(spec, cgroup="2") != []


def test_other_containers_namespaces_are_refused_whatever_the_config() -> None:
    everything = {"host_namespaces": ["pid", "ipc", "uts", "network", "userns", "cgroup"]}
    for key in ("PidMode", "IpcMode", "NetworkMode", "UTSMode"):
        spec = with_host(**{key: "container:" + "d" * 64})
        (reason,) = reasons(spec, **everything)
        assert reason.startswith(f"HostConfig.{key}") and "another container" in reason


def test_no_new_privileges_is_always_fine_and_privileged_implies_label_disable() -> None:
    assert reasons(with_host(SecurityOpt=["no-new-privileges", "no-new-privileges:true"])) == []
    spec = with_host(Privileged=True, SecurityOpt=["label=disable"])
    assert reasons(spec, privileged=True) == []
    assert len(reasons(spec)) == 2  # privileged, and label=disable without it


def bind_spec(source: str, **options: Any) -> ContainerSpec:
    data = inspect()
    data["Mounts"] = [{"Type": "bind", "Source": source, "Destination": "/data", "RW": True}]
    spec = spec_from_inspect(data)
    spec.body["HostConfig"]["Mounts"][0].update(options)
    return spec


def test_binds_are_refused_unless_under_an_accepted_prefix(tmp_path: Path) -> None:
    (tmp_path / "data" / "app").mkdir(parents=True)
    (tmp_path / "data" / "escape").symlink_to("/")
    ok = str(tmp_path / "data" / "app")
    (reason,) = reasons(bind_spec("/"))
    assert reason.startswith("HostConfig.Mounts '/data'") and "bind_prefixes" in reason
    assert reasons(bind_spec(ok), bind_prefixes=[tmp_path / "data"]) == []
    # A prefix is a directory, not a string prefix; no climbing out, no symlinks out.
    for bad in (f"{tmp_path}/database", f"{ok}/../../../etc", f"{tmp_path}/data/escape/etc"):
        assert reasons(bind_spec(bad), bind_prefixes=[tmp_path / "data"]), bad
    assert reasons(bind_spec("relative/path"), bind_prefixes=[Path("/")]) != []
    # Docker would create a missing bind source: not accepted.
    spec = bind_spec(ok, BindOptions={"CreateMountpoint": True})
    assert reasons(spec, bind_prefixes=[tmp_path / "data"]) != []


def test_volume_mounts_may_not_carry_driver_options_or_name_other_volumes() -> None:
    data = inspect()
    data["Mounts"] = [{"Type": "volume", "Name": "v1", "Source": "/x", "Destination": "/v"}]
    spec = spec_from_inspect(data)
    assert reasons(spec) == []
    # A local volume with type=none,o=bind is a bind mount of any host path.
    bound = copy.deepcopy(spec)
    bound.body["HostConfig"]["Mounts"][0]["VolumeOptions"] = {
        "DriverConfig": {"Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}
    }
    (reason,) = reasons(bound)
    assert "DriverConfig" in reason
    other = copy.deepcopy(spec)
    other.body["HostConfig"]["Mounts"][0]["Source"] = "someone-elses"
    assert "not in the spec" in reasons(other)[0]


def test_unknown_keys_are_refused_by_name() -> None:
    spec = with_host(Runtime="evil-runtime", CgroupParent="/", Binds=["/:/host"])
    spec.body["Volumes"] = {"/x": {}}
    got = reasons(spec)
    assert [r.split(":")[0] for r in got] == [
        "Volumes",
        "HostConfig.Binds",
        "HostConfig.CgroupParent",
        "HostConfig.Runtime",
    ]
    spec = spec_from_inspect(inspect())
    spec.body["NetworkingConfig"] = {"EndpointsConfig": {"bridge": {"DriverOpts": {"a": "b"}}}}
    assert reasons(spec) != []


def test_wrong_types_inside_the_body_are_refusals_not_crashes() -> None:
    for host in (
        {"CapAdd": "SYS_ADMIN"},
        {"Devices": "/dev/mem"},
        {"Mounts": {"Type": "bind"}},
        {"Sysctls": ["a"]},
        {"PidMode": 5},
        {"SecurityOpt": [1]},
        {"Annotations": ["org.criu.config"]},
    ):
        assert reasons(with_host(**host)), host
    spec = spec_from_inspect(inspect())
    spec.body["HostConfig"] = "privileged please"
    assert reasons(spec) == ["HostConfig: must be an object"]


def test_parse_spec_keeps_the_dump_options() -> None:
    # Dropping them would restore file-lock images without file-locks: locks lost silently.
    spec = spec_from_inspect(inspect())
    spec.dump_options = ["tcp-established", "file-locks"]
    assert parse_spec(spec.to_dict()).dump_options == ["tcp-established", "file-locks"]
    with pytest.raises(SpecShapeError, match="dump_options"):
        parse_spec({**spec.to_dict(), "dump_options": ["--exec-cmd /bin/sh"]})


def test_parse_spec_refuses_wrong_shapes_in_one_line() -> None:
    good = spec_from_inspect(inspect()).to_dict()
    assert parse_spec(good).name == "app"
    for bad, where in (
        (5, "spec"),
        ({**good, "body": "x"}, "spec.body"),
        ({**good, "ports": "x"}, "spec.ports"),
        ({**good, "image_id": "latest"}, "spec.image_id"),
        ({**good, "name": "../etc"}, "spec.name"),
        ({**good, "volumes": [{"name": 5}]}, "spec.volumes.0"),
        ({**good, "memory_limit": "lots"}, "spec.memory_limit"),
    ):
        with pytest.raises(SpecShapeError) as err:
            parse_spec(bad)
        assert str(err.value).startswith(where), err.value
        assert "\n" not in str(err.value)

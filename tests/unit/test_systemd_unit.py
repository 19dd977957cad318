"""The systemd unit passes `systemd-analyze verify`; install.sh refuses non-root clearly."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "ferry.service"
INSTALL = ROOT / "systemd" / "install.sh"


def _directives() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return {f"{s}.{k}": [v] for s in parser.sections() for k, v in parser.items(s)}


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (apt-get install systemd)"
    ferry = Path(sys.executable).parent / "ferry"
    assert ferry.exists(), f"{ferry} missing: the venv has no ferry entry point"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/ferry run --config /etc/ferry/config.yaml" in text
    # verify insists that ExecStart's binary exists; the installed path may not here.
    (tmp_path / "ferry.service").write_text(
        text.replace("ExecStart=/usr/local/bin/ferry", f"ExecStart={ferry}")
    )
    # Requires=docker.service must resolve; a stub stands in on machines without Docker's unit.
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"}
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "ferry.service")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys; any output at all is a problem.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr
    )


def test_unit_has_the_service_contract() -> None:
    d = _directives()
    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.WatchdogSec": "30s",
        "Service.Restart": "on-failure",
        "Service.StateDirectory": "ferry",
        "Service.RuntimeDirectory": "ferry",
        "Service.RuntimeDirectoryMode": "0700",
        "Service.ConfigurationDirectory": "ferry",
        "Service.ProtectSystem": "full",
        "Service.NoNewPrivileges": "yes",
        "Unit.Requires": "docker.service",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], f"{key}: {d.get(key)}"
    assert "docker.service" in d["Unit.After"][0] and "network-online.target" in d["Unit.After"][0]


@pytest.mark.parametrize(
    "option",
    [
        "ProtectSystem",
        "PrivateTmp",
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "PrivateDevices",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "ProtectControlGroups",
        "ProtectHome",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictAddressFamilies",
    ],
)
def test_each_risky_option_is_explained(option: str) -> None:
    lines = UNIT.read_text().splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.lstrip("#").startswith(f"{option}="))
    assert lines[idx - 1].startswith("#"), f"{option} has no comment saying why"


def test_install_refuses_when_not_root() -> None:
    argv = ["bash", str(INSTALL)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run as an unprivileged user"
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "must run as root" in proc.stderr
    assert proc.stdout == ""


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


def test_every_hardening_option_kept_off_says_why() -> None:
    lines = UNIT.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# --- Hardening"))
    kept_off = [
        i
        for i, ln in enumerate(lines[start:], start)
        if (ln.startswith("#") and ln[1:2].isupper() and "=" in ln and " " not in ln)
        or ln.endswith("=no")
    ]
    assert kept_off, "the hardening section lists no option kept off"
    for i in kept_off:
        j = i - 1
        while lines[j].startswith("#") and not lines[j].startswith("# Not set"):
            j -= 1
        assert lines[j].startswith("# Not set"), f"{lines[i]}: no '# Not set: why' above it"


def test_install_refuses_an_unknown_deps_source() -> None:
    env = {**os.environ, "DEPS": "wheels", "DESTDIR": "/nonexistent-staging"}
    proc = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert "DEPS=wheels" in line and "DEPS=system" in line

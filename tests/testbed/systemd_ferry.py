"""Ferry as a systemd service on the systemd testbed hosts, installed the README's way.

Each step is one of README.md "Install as a service", run inside the host:
a checkout of this repository on the host, `make install DEPS=system` (no
package index inside the testbed), `ferry certs init/issue` on one host and
`ferry certs install` on each, the config written where the operator edits it,
`ferry check-config`, then `systemctl enable --now ferry`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.layout import AGENT_PORT, Host
from tests.testbed.progress import step
from tests.testbed.systemd_hosts import root_path, run_in

REPO = Path(__file__).resolve().parents[2]
SRC_IN_HOST = "/usr/local/src/ferry"
CA_IN_HOST = "/root/ferry-ca"
CONFIG = "/etc/ferry/config.yaml"
UNIT = "ferry.service"


def copy_checkout(host: Host) -> None:
    """The repository's files (tracked and new, not ignored) as a checkout on the host."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    dest = root_path(host, SRC_IN_HOST)
    shutil.rmtree(dest, ignore_errors=True)
    for rel in filter(None, listing.split("\0")):
        src = REPO / rel
        if not src.is_file():
            continue  # deleted in the work tree but still in the index
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def install(host: Host) -> str:
    """`make install DEPS=system` from the checkout; returns its output."""
    copy_checkout(host)
    proc = run_in(
        host, ["make", "-C", SRC_IN_HOST, "install", "DEPS=system"], timeout=300, check=True
    )
    return proc.stdout


def issue_certs(hosts: list[Host]) -> None:
    """CA and certificates made on the first host, each host's pair installed on it."""
    ca_host = hosts[0]
    run_in(ca_host, ["ferry", "certs", "init", "--dir", CA_IN_HOST], check=True)
    for h in hosts:
        run_in(ca_host, ["ferry", "certs", "issue", h.name, "--dir", CA_IN_HOST, "--ip", h.ip],
               check=True)  # fmt: skip
    ca_dir = root_path(ca_host, CA_IN_HOST)
    for h in hosts:
        if h is not ca_host:
            # The operator's copy: only the CA certificate and the host's own pair travel.
            dest = root_path(h, CA_IN_HOST)
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("ca.crt", f"{h.name}.crt", f"{h.name}.key"):
                shutil.copy2(ca_dir / name, dest / name)
        run_in(h, ["ferry", "certs", "install", h.name, "--dir", CA_IN_HOST, "--force"],
               check=True)  # fmt: skip


def write_config(host: Host, hosts: list[Host], **overrides: Any) -> dict[str, Any]:
    """Edit the installed config as the operator does: name, listen address, peers."""
    path = root_path(host, CONFIG)
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config.update(
        {
            "name": host.name,
            "listen": f"{host.ip}:{AGENT_PORT}",
            "peers": [
                {"name": p.name, "address": f"{p.ip}:{AGENT_PORT}"} for p in hosts if p is not host
            ],
            "limits": {**config.get("limits", {}), "max_concurrent_migrations": 2},
            "signals": {**config.get("signals", {}), "poll_interval": "1s"},
            **overrides,
        }
    )
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_in(host, ["ferry", "check-config", CONFIG], check=True)
    return config


def install_all(hosts: list[Host]) -> None:
    """Install, certify and configure Ferry on every host; the service is not started."""
    from concurrent.futures import ThreadPoolExecutor

    step(f"installing ferry on {', '.join(h.name for h in hosts)} (make install DEPS=system)")
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(install, hosts))
    issue_certs(hosts)
    for h in hosts:
        write_config(h, hosts)
    step("ferry installed and configured; `systemctl enable --now ferry` starts it")


def systemctl(host: Host, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_in(host, ["systemctl", *args], timeout=timeout)


def unit_property(host: Host, name: str, unit: str = UNIT) -> str:
    return systemctl(host, "show", "-p", name, "--value", unit).stdout.strip()


def main_pid(host: Host) -> int:
    """The agent's PID as seen from the root namespace (systemd reports the host's own)."""
    inner = int(unit_property(host, "MainPID") or 0)
    return outer_pid(host, inner) if inner else 0


def outer_pid(host: Host, inner: int) -> int:
    """The root-namespace PID of the host's process `inner` (NSpid: outer ... inner)."""
    host_ns = os.stat(f"/proc/{host.init_pid}/ns/pid").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != host_ns:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()[1:]
        if int(nspid[-1]) == inner:
            return int(entry)
    raise RuntimeError(f"{host.name}: no process with pid {inner} in its namespace")


def journal(host: Host, *args: str, unit: str = UNIT) -> list[dict[str, Any]]:
    """`journalctl -u UNIT -o json` entries (extra args filter, e.g. `_PID=...`)."""
    proc = run_in(host, ["journalctl", "-u", unit, "-o", "json", "--no-pager", *args])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def events(host: Host, name: str, *args: str) -> list[dict[str, Any]]:
    return [e for e in journal(host, f"EVENT={name}", *args) if e.get("EVENT") == name]


def ferry(host: Host, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed ferry CLI, run on the host as an operator would."""
    return run_in(host, ["ferry", *args], timeout=timeout)

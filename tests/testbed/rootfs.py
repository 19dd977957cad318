"""Build and cache the Debian rootfs every testbed host runs from.

The rootfs holds docker.io from trixie (experimental mode is switched on per
host) and CRIU >= 4.2 from forky: trixie's CRIU 4.1 cannot dump TCP sockets on
kernels >= 6.16. The cache key is a hash of this recipe, so editing the recipe
rebuilds it and nothing else does.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.testbed.layout import CACHE_DIR
from tests.testbed.progress import step

SUITE = "trixie"
CRIU_SUITE = "forky"
PACKAGES = ["docker.io", "iptables", "iproute2", "busybox-static", "tini", "ca-certificates"]
MIN_CRIU = (4, 2)
RECIPE_VERSION = 1


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses, so the testbed asks no other host."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list(.d); cannot debootstrap")


def rootfs_path() -> Path:
    return CACHE_DIR / f"rootfs-{recipe_hash()}"


def criu_version(root: Path) -> tuple[int, ...]:
    out = subprocess.run(
        ["chroot", str(root), "criu", "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"Version:\s*([\d.]+)", out)
    if not m:
        raise RuntimeError(f"cannot read CRIU version from: {out!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"{cmd[0]} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail)
        )


def ensure_rootfs() -> Path:
    """Return the cached rootfs, building it first if the recipe changed."""
    final = rootfs_path()
    if (final / ".ferry-rootfs-ok").exists():
        step(f"rootfs cached at {final}")
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    building = final.with_name(final.name + ".building")
    log = CACHE_DIR / "build.log"
    log.write_text("")
    _unmount_under(building)
    shutil.rmtree(building, ignore_errors=True)
    mirror = debian_mirror()
    step(f"debootstrap {SUITE} with docker.io (about 40 s; log {log})")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(building),
            mirror,
        ],
        log,
    )
    step(f"installing CRIU from {CRIU_SUITE} (pinned low: only criu and its libraries)")
    (building / "etc/apt/sources.list.d/criu.list").write_text(f"deb {mirror} {CRIU_SUITE} main\n")
    (building / "etc/apt/preferences.d/criu").write_text(
        f"Package: *\nPin: release n={CRIU_SUITE}\nPin-Priority: 100\n"
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # forky's Release file is past its Valid-Until date on the mirror.
    apt = ["chroot", str(building), "apt-get", "-q", "-o", "Acquire::Check-Valid-Until=false"]
    subprocess.run(["mount", "-t", "proc", "proc", str(building / "proc")], check=True)
    try:
        _run([*apt, "update"], log, env)
        _run([*apt, "install", "-y", "--no-install-recommends", "-t", CRIU_SUITE, "criu"], log, env)
        _run([*apt, "clean"], log, env)
    finally:
        subprocess.run(["umount", "-l", str(building / "proc")], check=False)
    version = criu_version(building)
    if version < MIN_CRIU:
        raise RuntimeError(f"CRIU {version} in rootfs is older than {MIN_CRIU}")
    step(f"CRIU {'.'.join(map(str, version))} installed")
    for d in ("var/lib/docker", "var/lib/containerd", "var/lib/ferry", "etc/docker"):
        (building / d).mkdir(parents=True, exist_ok=True)
    (building / ".ferry-rootfs-ok").write_text(recipe_hash() + "\n")
    for old in CACHE_DIR.glob("rootfs-*"):
        if old != building and old.is_dir():
            _unmount_under(old)
            shutil.rmtree(old, ignore_errors=True)
    building.rename(final)
    return final


def _unmount_under(path: Path) -> None:
    prefix = str(path)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mnt = line.split()[4]
        if mnt == prefix or mnt.startswith(prefix + "/"):
            subprocess.run(["umount", "-l", mnt], check=False)

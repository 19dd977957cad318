"""Build and cache the rootfs for testbed hosts that boot systemd as PID 1.

It is the plain testbed rootfs (docker.io, CRIU 4.2) plus systemd, the Docker
client, and what `systemd/install.sh` needs to install Ferry without a package
index: python3 with venv, the Debian packages of Ferry's dependencies, and make.
The Python stack comes from forky, like CRIU: trixie has no blake3 and an
etcd3gw older than 2.7, and forky's blake3 is built for its Python 3.14. (The
dev venv's binary wheels are for the machine's Python 3.11 and cannot serve.)
The cache key hashes this recipe together with the plain rootfs's, so
editing either rebuilds it and nothing else does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.testbed import rootfs as plain
from tests.testbed.layout import CACHE_DIR
from tests.testbed.progress import step

SYSTEMD_PACKAGES = ["systemd", "systemd-sysv", "dbus", "libpam-systemd", "docker-cli", "make"]
# Ferry's runtime dependencies as Debian packages (pyproject.toml's
# [project.dependencies]); install.sh with DEPS=system builds its venv on them.
# Installed from forky (see the module doc).
PYTHON_PACKAGES = [
    "python3",
    "python3-venv",
    "python3-setuptools",
    "python3-docker",
    "python3-watchdog",
    "python3-pydantic",
    "python3-structlog",
    "python3-yaml",
    "python3-click",
    "python3-rich",
    "python3-aiohttp",
    "python3-cryptography",
    "python3-prometheus-client",
    "python3-zstandard",
    "python3-etcd3gw",
    "python3-blake3",
]
# Units that cannot work in a namespaced host: this kernel has no modules (kmod
# fails and marks the system degraded), and udev must stay off the machine's
# devices. Gettys and first-boot prompts would wait on a console nobody reads.
MASKED_UNITS = [
    "systemd-modules-load.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-firstboot.service",
    "console-getty.service",
    "getty@.service",
    "getty.target",
]
# The boot ID comes from the machine's kernel, so a persistent journal would show
# every testbed boot as one: keep it in /run.
JOURNALD_CONF = "[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n"
# Docker's checkpoint API is experimental; the hosts' docker.service reads this.
DAEMON_JSON = '{\n  "experimental": true,\n  "storage-driver": "overlay2"\n}\n'
OK_FILE = ".ferry-systemd-rootfs-ok"


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(plain.recipe_hash().encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def rootfs_path() -> Path:
    # Not "rootfs-*": the plain builder removes every other rootfs-* it finds.
    return CACHE_DIR / f"systemd-rootfs-{recipe_hash()}"


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    # Several testbeds (FERRY_TESTBED_ID) share the cache: one builds, the others wait.
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".systemd-rootfs.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_systemd_rootfs() -> Path:
    """Return the cached systemd rootfs, building it (from the plain one) if needed."""
    final = rootfs_path()
    if (final / OK_FILE).exists():
        step(f"systemd rootfs cached at {final}")
        return final
    base = plain.ensure_rootfs()
    with _build_lock():
        if (final / OK_FILE).exists():
            return final
        _build(base, final)
    return final


def _build(base: Path, final: Path) -> None:
    building = final.with_name(final.name + ".building")
    log = CACHE_DIR / "systemd-build.log"
    log.write_text("")
    plain._unmount_under(building)
    shutil.rmtree(building, ignore_errors=True)
    step(f"copying the plain rootfs to build the systemd one (log {log})")
    plain._run(["cp", "-a", "--reflink=auto", str(base), str(building)], log)
    (building / ".ferry-rootfs-ok").unlink(missing_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["chroot", str(building), "apt-get", "-q", "-o", "Acquire::Check-Valid-Until=false"]
    step("installing systemd, docker-cli, python3 and Ferry's dependencies (about a minute)")
    subprocess.run(["mount", "-t", "proc", "proc", str(building / "proc")], check=True)
    try:
        plain._run([*apt, "update"], log, env)
        plain._run(
            [
                *apt,
                "install",
                "-y",
                "--no-install-recommends",
                "-t",
                plain.SUITE,
                *SYSTEMD_PACKAGES,
            ],
            log,
            env,
        )
        # -t makes forky the preferred suite for this transaction only: the
        # Python packages and what they need (a newer libc6) come from it.
        plain._run(
            [*apt, "install", "-y", "--no-install-recommends", "-t", plain.CRIU_SUITE,
             *PYTHON_PACKAGES],
            log,
            env,
        )  # fmt: skip
        plain._run([*apt, "clean"], log, env)
    finally:
        subprocess.run(["umount", "-l", str(building / "proc")], check=False)
    for unit in MASKED_UNITS:
        link = building / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    conf = building / "etc/systemd/journald.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "testbed.conf").write_text(JOURNALD_CONF)
    (building / "etc/docker").mkdir(parents=True, exist_ok=True)
    (building / "etc/docker/daemon.json").write_text(DAEMON_JSON)
    # Each host gets its own machine-id at boot; an empty one here would mean "first boot".
    (building / "etc/machine-id").unlink(missing_ok=True)
    (building / OK_FILE).write_text(recipe_hash() + "\n")
    for old in CACHE_DIR.glob("systemd-rootfs-*"):
        if old != building and old.is_dir():
            plain._unmount_under(old)
            shutil.rmtree(old, ignore_errors=True)
    building.rename(final)
    step(f"systemd rootfs built at {final}")

"""Debian's etcd-server (trixie, 3.5), unpacked once into the testbed cache.

The machine's own release may carry an older etcd (bookworm: 3.4), so the
package is fetched from the same Debian mirror apt already uses, with a
private apt state directory that leaves the machine's apt configuration
untouched, and only its binary is kept. etcd is a Go program that needs only
libc, so it runs both on the machine and inside a testbed host's namespaces.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.testbed.layout import CACHE_DIR
from tests.testbed.progress import step
from tests.testbed.rootfs import SUITE, debian_mirror

PACKAGE = "etcd-server"
CACHE = CACHE_DIR / f"etcd-{SUITE}"


def etcd_binary() -> Path:
    """Path of the cached etcd binary, fetching the Debian package the first time."""
    binary = CACHE / "usr" / "bin" / "etcd"
    if binary.exists():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".etcd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs fetch it once
        if binary.exists():
            return binary
        _fetch(CACHE)
    return binary


def _fetch(dest: Path) -> None:
    step(f"fetching Debian {SUITE}'s {PACKAGE} (once; cached in {dest})")
    with tempfile.TemporaryDirectory(prefix="ferry-etcd-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {debian_mirror()} {SUITE} main\n")
        opts = [
            "-o", f"Dir::Etc::sourcelist={work / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        subprocess.run(["apt-get", "-q", *opts, "update"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "-q", *opts, "download", PACKAGE],
            check=True,
            capture_output=True,
            cwd=work,
        )
        deb = next(work.glob(f"{PACKAGE}_*.deb"))
        unpacked = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "usr" / "bin").mkdir(parents=True)
        shutil.copy2(unpacked / "usr" / "bin" / "etcd", partial / "usr" / "bin" / "etcd")
        (partial / "VERSION").write_text(deb.name + "\n")
        partial.rename(dest)

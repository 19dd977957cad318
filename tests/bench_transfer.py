"""Ferry's own share of a migration's downtime, measured on loopback.

pack -> mutual-TLS upload over 127.0.0.1 -> verified unpack, for ~256 MiB of
random data (like CRIU pages of a busy process) plus a few thousand small
files (like an overlay upper dir). The clock runs from the first packed byte
to the last unpacked one, as the freeze-to-restore window does on a target:
receive_state, then the restore call with the digest.

    .venv/bin/python -m tests.bench_transfer                  # this tree vs git HEAD, side by side
    .venv/bin/python -m tests.bench_transfer --baseline REV   # this tree vs REV
    .venv/bin/python -m tests.bench_transfer --only           # this tree only

The baseline runs from `git archive REV agent` in a subprocess, on the same
data, so "before" and "after" come from one run on one machine. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIG_MIB = int(os.environ.get("FERRY_BENCH_MIB", "256"))
SMALL_FILES = int(os.environ.get("FERRY_BENCH_SMALL_FILES", "3000"))


def make_data(base: Path, mib: int = BIG_MIB, small_files: int = SMALL_FILES) -> dict[str, Path]:
    ckpt, upper = base / "checkpoint", base / "upper"
    if (base / "ok").exists():
        return {"checkpoint": ckpt, "upper": upper}
    shutil.rmtree(base, ignore_errors=True)
    ckpt.mkdir(parents=True)
    upper.mkdir()
    left = mib << 20
    i = 0
    while left:  # CRIU writes a few big pages-N.img files
        n = min(left, 96 << 20)
        with open(ckpt / f"pages-{i}.img", "wb") as f:
            for _ in range(n >> 20):
                f.write(os.urandom(1 << 20))
        left -= n
        i += 1
    for name in ("inventory.img", "core-1.img", "mm-1.img", "files.img"):
        (ckpt / name).write_bytes(os.urandom(4096))
    rnd = random.Random(7)
    for j in range(small_files):
        d = upper / f"d{j % 40}" / f"e{j % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.choice((0, 100, 700, 3000, 9000, 30000))
        # text-like, compressible content as in config files and logs
        (d / f"f{j}.txt").write_bytes(
            (f"line {j} of a small file\n" * (size // 24 + 1)).encode()[:size]
        )
    (base / "ok").write_text("")
    return {"checkpoint": ckpt, "upper": upper}


def _pki(base: Path) -> tuple[Any, Any]:
    from agent.peer import certs
    from agent.peer.tls import client_context, server_context

    ca = base / "pki"
    if not (ca / "beta.key").exists():
        shutil.rmtree(ca, ignore_errors=True)
        certs.init_ca(ca)
        for host in ("alpha", "beta"):
            certs.issue_host_cert(ca, host, ips=("127.0.0.1",))
    srv = server_context(ca / "ca.crt", ca / "alpha.crt", ca / "alpha.key")
    cli = client_context(ca / "ca.crt", ca / "beta.crt", ca / "beta.key")
    return srv, cli


class BenchHandlers:
    """receive_state + restore as the target does them, with the API this tree has."""

    def __init__(self, spool_dir: Path, dests: dict[str, Path]) -> None:
        self.spool_dir = spool_dir
        self.dests = dests
        self.pending: Any = None

    async def health(self) -> dict[str, Any]:
        return {}

    async def receive_state(
        self, peer: str, mid: str, stream: Any, digest: str | None
    ) -> dict[str, Any]:
        from agent import archive

        if hasattr(archive, "StagedUnpack"):
            staged = archive.StagedUnpack(self.dests, max_raw_bytes=1 << 40)
            res = await staged.receive(stream, expected_digest=digest)
            self.pending = staged
            return {"digest": res.digest, "bytes": res.size}
        res = await archive.spool(stream, self.spool_dir / f"{mid}.zst", expected_digest=digest)
        return {"digest": res.digest, "bytes": res.size}

    async def restore(self, peer: str, mid: str, body: dict[str, Any]) -> dict[str, Any]:
        from agent import archive

        if self.pending is not None:
            await asyncio.to_thread(self.pending.commit, body["digest"])
            return {}
        await asyncio.to_thread(
            archive.unpack_file,
            self.spool_dir / f"{mid}.zst",
            self.dests,
            expected_digest=body["digest"],
            max_raw_bytes=1 << 40,
        )
        return {}


async def _one_run(sections: dict[str, Path], work: Path, srv: Any, cli: Any) -> dict[str, float]:
    from agent import archive
    from agent.peer.api import migration_path
    from agent.peer.client import PeerClient, PeerTimeouts
    from agent.peer.server import make_peer_app, start_peer_server

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "spool").mkdir(parents=True)
    dests = {"checkpoint": out / "c" / "checkpoints" / "ck", "upper": out / "o" / "diff"}
    dests["upper"].mkdir(parents=True)  # Docker made the upper dir at create; it is empty
    handlers = BenchHandlers(out / "spool", dests)
    app = make_peer_app(handlers, {"beta"}, 1 << 40)  # type: ignore[arg-type]
    server = await start_peer_server(app, "127.0.0.1", 0, srv)
    try:
        async with PeerClient("alpha", f"127.0.0.1:{server.port}", cli, PeerTimeouts()) as c:
            await c.health()  # connection and TLS handshake outside the clock
            t0 = time.perf_counter()
            packer = archive.Packer(sections)
            sent = await c.upload_state("m1", packer.aiter())
            t1 = time.perf_counter()
            await c.post_json(migration_path("m1", "restore"), {"digest": packer.digest})
            t2 = time.perf_counter()
    finally:
        await server.close()
    assert sent["digest"] == packer.digest
    got = (dests["checkpoint"] / "pages-0.img").stat().st_size
    assert got == (sections["checkpoint"] / "pages-0.img").stat().st_size
    assert len(list((dests["upper"] / "d0").rglob("*.txt"))) == len(
        list((sections["upper"] / "d0").rglob("*.txt"))
    )
    raw = packer.stats.raw_bytes
    return {
        "raw_mb": raw / 1e6,
        "wire_mb": packer.stats.compressed_bytes / 1e6,
        "transfer_s": t1 - t0,
        "restore_s": t2 - t1,
        "total_s": t2 - t0,
        "mb_per_s": raw / 1e6 / (t2 - t0),
    }


def measure(data: Path, work: Path, runs: int) -> list[dict[str, float]]:
    sections = make_data(data)
    srv, cli = _pki(work.parent)
    results = []
    for _ in range(runs):
        results.append(asyncio.run(_one_run(sections, work, srv, cli)))
    shutil.rmtree(work / "out", ignore_errors=True)
    return results


def _best(results: list[dict[str, float]]) -> dict[str, float]:
    return min(results, key=lambda r: r["total_s"])


def _line(label: str, r: dict[str, float]) -> str:
    return (
        f"{label:<9} {r['total_s']:6.2f} s  {r['mb_per_s']:6.0f} MB/s  "
        f"(upload {r['transfer_s']:5.2f} s, restore call {r['restore_s']:5.2f} s; "
        f"{r['raw_mb']:.0f} MB raw, {r['wire_mb']:.0f} MB on the wire)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    ap.add_argument("--only", action="store_true", help="measure this tree only")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", dest="json_out", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    base = Path(args.dir or os.path.join(tempfile.gettempdir(), "ferry-bench-transfer"))
    base.mkdir(exist_ok=True)
    if args.json_out:  # the baseline's child process
        print(json.dumps(measure(base / "data", base / "work-old", args.runs)))
        return
    make_data(base / "data")
    before = None
    if not args.only:
        old = base / "baseline"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline, "agent"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
        shutil.copytree(ROOT / "tests", old / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, PYTHONPATH=str(old))
        child_cmd = [sys.executable, "-m", "tests.bench_transfer", "--json"]
        child = subprocess.run(
            [*child_cmd, f"--runs={args.runs}", "--dir", str(base)],
            cwd=old,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        before = _best(json.loads(child.stdout.splitlines()[-1]))
    after = _best(measure(base / "data", base / "work-new", args.runs))
    print(f"pack -> mTLS loopback upload -> verified unpack, best of {args.runs}")
    if before is not None:
        print(_line(f"{args.baseline[:9]}", before))
    print(_line("this tree", after))
    if before is not None:
        print(
            f"ratio new/old: time {after['total_s'] / before['total_s']:.2f}, "
            f"throughput {after['mb_per_s'] / before['mb_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()

"""Host load (PSI with loadavg fallback) and memory/disk sources, from fixture /proc trees."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NamedTuple

import pytest
from structlog.testing import capture_logs

from agent.model import DockerEvent, Sample
from agent.signals.memory import MemoryDiskSource, parse_meminfo
from agent.signals.pressure import HostLoadSource, parse_loadavg, parse_psi
from agent.signals.store import SignalStore
from tests.helpers import FakeClock

PROC = Path(__file__).parent / "fixtures" / "proc"


class ListSink:
    def __init__(self) -> None:
        self.samples: dict[str, Sample] = {}

    def publish(self, sample: Sample) -> None:
        self.samples[sample.name] = sample

    def publish_event(self, event: DockerEvent) -> None:
        raise AssertionError("no events expected")

    def value(self, name: str) -> float | None:
        s = self.samples.get(name)
        return s.value if s else None


def test_parsers() -> None:
    assert parse_loadavg("0.52 0.58 0.59 1/467 12345\n") == (0.52, 0.58, 0.59)
    parsed = parse_psi("some avg10=1.19 avg60=0.53 avg300=0.42 total=4012275\n")
    assert parsed == {"some": {"avg10": 1.19, "avg60": 0.53, "avg300": 0.42}}
    with pytest.raises(ValueError):
        parse_psi("garbage\n")
    with pytest.raises(ValueError):
        parse_loadavg("1.0\n")


def test_psi_and_loadavg_from_fixture() -> None:
    sink = ListSink()
    source = HostLoadSource(PROC / "psi", FakeClock(), interval=5, cpu_count=4)
    with capture_logs() as logs:
        source.poll(sink)
    assert not [e for e in logs if e["log_level"] == "warning"]
    assert source.psi_enabled is True

    assert sink.value("load.1") == 1.5
    assert sink.value("load.5") == 0.75
    assert sink.value("load.15") == 0.25
    assert sink.value("load.per_core.1") == pytest.approx(0.375)
    assert sink.value("psi.available") == 1.0
    assert sink.value("psi.cpu.some.avg10") == 12.5
    assert sink.value("psi.cpu.some.avg60") == 8.25
    assert sink.value("psi.cpu.full.avg300") == 0.0
    assert sink.value("psi.memory.full.avg10") == 1.5
    assert sink.value("psi.io.some.avg300") == 10.0
    assert sink.value("psi.io.full.avg60") == 15.0
    assert sink.samples["load.1"].ts == FakeClock().time()
    psi_names = [n for n in sink.samples if n.startswith("psi.") and n != "psi.available"]
    assert len(psi_names) == 3 * 2 * 3


@pytest.mark.parametrize(
    ("tree", "reason_part"),
    [("nopsi", "does not exist"), ("psi_unreadable", "cannot read")],
)
def test_kernel_without_psi_warns_once_and_serves_loadavg(tree: str, reason_part: str) -> None:
    store = SignalStore(FakeClock())
    source = HostLoadSource(PROC / tree, FakeClock(), interval=5, cpu_count=2)
    with capture_logs() as logs:
        for _ in range(3):
            source.poll(store)

    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    assert warnings[0]["event"] == "signals.psi_unavailable"
    assert reason_part in warnings[0]["reason"]
    assert warnings[0]["fallback"] == "loadavg"
    assert source.psi_enabled is False
    assert store.value("load.1") == 6.0
    assert store.value("load.per_core.1") == 3.0
    assert store.value("psi.available") == 0.0
    assert store.value("psi.cpu.some.avg10") is None


def test_loadavg_missing_is_logged_not_fatal(tmp_path: Path) -> None:
    sink = ListSink()
    with capture_logs() as logs:
        HostLoadSource(tmp_path, FakeClock(), cpu_count=1).poll(sink)
    assert "signals.loadavg_unreadable" in [e["event"] for e in logs]
    assert sink.value("load.1") is None


class FakeStatvfs(NamedTuple):
    f_frsize: int
    f_blocks: int
    f_bavail: int


def test_memory_and_disk_from_fixture_and_fake_statvfs() -> None:
    calls: list[str] = []

    def statvfs(path: str) -> FakeStatvfs:
        calls.append(path)
        return FakeStatvfs(f_frsize=4096, f_blocks=1000, f_bavail=250)

    sink = ListSink()
    MemoryDiskSource(PROC / "psi", Path("/srv/docker"), FakeClock(), statvfs=statvfs).poll(sink)
    assert calls == ["/srv/docker"]
    assert sink.value("mem.available_bytes") == 2_000_000 * 1024
    assert sink.value("mem.total_bytes") == 8_000_000 * 1024
    assert sink.value("mem.available_ratio") == pytest.approx(0.25)
    assert sink.value("disk.docker.free_bytes") == 250 * 4096
    assert sink.value("disk.docker.total_bytes") == 1000 * 4096
    assert sink.value("disk.docker.free_ratio") == pytest.approx(0.25)


def test_meminfo_without_memavailable_estimates_from_free_and_cache() -> None:
    info = parse_meminfo((PROC / "nopsi" / "meminfo").read_text())
    assert "MemAvailable" not in info
    sink = ListSink()
    MemoryDiskSource(
        PROC / "nopsi", Path("/x"), FakeClock(), statvfs=lambda p: FakeStatvfs(1, 1, 1)
    ).poll(sink)
    assert sink.value("mem.available_bytes") == (500_000 + 100_000 + 400_000) * 1024
    assert sink.value("mem.available_ratio") == pytest.approx(0.25)


def test_statvfs_failure_warns_once_and_recovers() -> None:
    fail = True

    def statvfs(path: str) -> FakeStatvfs:
        if fail:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return FakeStatvfs(4096, 10, 5)

    sink = ListSink()
    source = MemoryDiskSource(PROC / "psi", Path("/nope"), FakeClock(), statvfs=statvfs)
    with capture_logs() as logs:
        source.poll(sink)
        source.poll(sink)
        assert sink.value("disk.docker.free_bytes") is None
        assert sink.value("mem.available_bytes") is not None
        fail = False
        source.poll(sink)
    assert [e["event"] for e in logs] == [
        "signals.memory_unreadable",
        "signals.memory_readable_again",
    ]
    assert sink.value("disk.docker.free_ratio") == 0.5


def test_real_proc_smoke() -> None:
    """The parsers accept this machine's /proc (whatever its kernel offers)."""
    sink = ListSink()
    HostLoadSource(Path("/proc"), FakeClock()).poll(sink)
    MemoryDiskSource(Path("/proc"), Path("/"), FakeClock()).poll(sink)
    assert sink.value("load.1") is not None
    assert 0.0 <= (sink.value("mem.available_ratio") or -1) <= 1.0
    assert (sink.value("disk.docker.free_bytes") or 0) > 0

"""Host load: PSI (pressure stall information) with a loadavg fallback.

PSI says how much time tasks actually stalled on CPU, memory or IO, which is
what "this host is overloaded" means; loadavg only counts runnable tasks. So
PSI is preferred, and like watchdog picking inotify and falling back to
polling, the source picks its backend once: when the kernel has no PSI
(`/proc/pressure` missing, or present but failing with EOPNOTSUPP when booted
with psi=0) it logs one warning and serves loadavg only.

Signals: load.1 load.5 load.15, load.per_core.1/5/15, psi.available, and
psi.<cpu|memory|io>.<some|full>.<avg10|avg60|avg300> (percent).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from agent.model import Clock, Sample, SignalSink, SystemClock
from agent.signals.polled import PolledSource

log = structlog.get_logger(__name__)

PSI_RESOURCES = ("cpu", "memory", "io")
_PSI_FIELDS = ("avg10", "avg60", "avg300")


class ProcFormatError(ValueError):
    pass


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """`/proc/loadavg`: "0.52 0.58 0.59 1/467 12345"."""
    parts = text.split()
    if len(parts) < 3:
        raise ProcFormatError(f"unexpected loadavg content: {text!r}")
    return float(parts[0]), float(parts[1]), float(parts[2])


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """One `/proc/pressure/<resource>` file -> {"some": {"avg10": ..}, "full": {..}}.

    `full` is absent for cpu on kernels before 5.13; such lines are simply missing.
    """
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        values: dict[str, float] = {}
        for item in rest.split():
            key, _, raw = item.partition("=")
            if key in _PSI_FIELDS:
                values[key] = float(raw)
        if values:
            out[kind] = values
    if not out:
        raise ProcFormatError(f"no PSI lines in {text!r}")
    return out


class HostLoadSource(PolledSource):
    """Polls loadavg and PSI every `interval` seconds."""

    prefixes = ("load.", "psi.")

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        clock: Clock | None = None,
        interval: float = 5.0,
        cpu_count: int | None = None,
        name: str = "host_load",
    ) -> None:
        self.name = name
        self.proc_root = Path(proc_root)
        self.clock: Clock = clock or SystemClock()
        self.interval = interval
        self.cpu_count = cpu_count or os.cpu_count() or 1
        # None until the first probe decides; then fixed for the source's life.
        self.psi_enabled: bool | None = None

    def poll(self, sink: SignalSink) -> None:
        """One reading of everything; public so tests and `ferry status` can call it."""
        now = self.clock.time()
        try:
            l1, l5, l15 = parse_loadavg((self.proc_root / "loadavg").read_text())
        except (OSError, ValueError) as exc:
            log.warning("signals.loadavg_unreadable", error=str(exc))
        else:
            for window, value in (("1", l1), ("5", l5), ("15", l15)):
                sink.publish(Sample(f"load.{window}", value, now))
                sink.publish(Sample(f"load.per_core.{window}", value / self.cpu_count, now))

        if self.psi_enabled is None:
            self.psi_enabled = self._probe_psi()
        sink.publish(Sample("psi.available", 1.0 if self.psi_enabled else 0.0, now))
        if not self.psi_enabled:
            return
        for resource in PSI_RESOURCES:
            try:
                parsed = parse_psi((self.proc_root / "pressure" / resource).read_text())
            except (OSError, ValueError) as exc:
                # PSI worked at the probe, so this is transient (or one resource
                # is missing); skip it this round rather than switch backends.
                log.debug("signals.psi_read_failed", resource=resource, error=str(exc))
                continue
            for kind, values in parsed.items():
                for key, value in values.items():
                    sink.publish(Sample(f"psi.{resource}.{kind}.{key}", value, now))

    def _probe_psi(self) -> bool:
        path = self.proc_root / "pressure" / "cpu"
        try:
            parse_psi(path.read_text())
        except FileNotFoundError:
            reason = f"{self.proc_root / 'pressure'} does not exist (kernel without PSI)"
        except OSError as exc:
            # EOPNOTSUPP: CONFIG_PSI built in but disabled (psi=0 on the command line).
            reason = f"cannot read {path}: {exc.strerror or exc}"
        except ValueError as exc:
            reason = f"cannot parse {path}: {exc}"
        else:
            return True
        log.warning(
            "signals.psi_unavailable",
            reason=reason,
            fallback="loadavg",
            detail="host load is judged by load.* only; psi.* signals stay unknown",
        )
        return False

"""Custom plugin monitors, after node-problem-detector's custom plugin monitor.

An operator's script runs every `interval` seconds with a `timeout`. Its exit
code is the verdict: 0 OK (0.0), 1 problem (1.0), anything else, a timeout or
failure to start: unknown (2.0). `command.<name>` carries the verdict and the
first line of output as its "reason" label (`SignalStore.reason(...)`).

The script runs in its own session so a timeout kills the whole process group:
`sh -c "sleep 60"` would otherwise leave the sleep holding the output pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from agent.model import Clock, Sample, SignalSink, SystemClock
from agent.signals.store import LABEL_REASON

log = structlog.get_logger(__name__)

OK, PROBLEM, UNKNOWN = 0.0, 1.0, 2.0
MAX_REASON_CHARS = 256
MAX_OUTPUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class CommandMonitorSpec:
    """One monitor. A string command runs through `/bin/sh -c`; a list is exec'd directly."""

    name: str
    command: str | Sequence[str]
    interval: float = 30.0
    timeout: float = 10.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    value: float
    reason: str
    exit_code: int | None  # None when it timed out or could not start


def verdict(exit_code: int | None) -> float:
    if exit_code == 0:
        return OK
    if exit_code == 1:
        return PROBLEM
    return UNKNOWN


def first_line(output: bytes) -> str:
    for line in output.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            return line.strip()[:MAX_REASON_CHARS]
    return ""


class CommandSource:
    """Runs one `CommandMonitorSpec` periodically."""

    def __init__(self, spec: CommandMonitorSpec, clock: Clock | None = None) -> None:
        self.spec = spec
        self.name = f"command.{spec.name}"
        self.clock: Clock = clock or SystemClock()

    def max_ages(self) -> dict[str, float | None]:
        # A check may legitimately take interval + timeout between two results.
        return {self.name: 2 * (self.spec.interval + self.spec.timeout) + 5.0}

    async def run(self, sink: SignalSink) -> None:
        while True:
            result = await self.check()
            labels = {LABEL_REASON: result.reason}
            if result.exit_code is not None:
                labels["exit_code"] = str(result.exit_code)
            sink.publish(Sample(self.name, result.value, self.clock.time(), labels))
            await asyncio.sleep(self.spec.interval)

    async def check(self) -> CheckResult:
        spec = self.spec
        env = {**os.environ, **spec.env} if spec.env else None
        try:
            if isinstance(spec.command, str):
                proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    spec.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            else:
                proc = await asyncio.create_subprocess_exec(
                    *spec.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
        except OSError as exc:
            log.warning("signals.command_failed_to_start", monitor=spec.name, error=str(exc))
            return CheckResult(UNKNOWN, f"cannot start: {exc}", None)

        try:
            output = await asyncio.wait_for(self._read(proc), spec.timeout)
        except TimeoutError:
            await _kill(proc)
            log.warning("signals.command_timeout", monitor=spec.name, timeout=spec.timeout)
            return CheckResult(UNKNOWN, f"timed out after {spec.timeout:g}s", None)
        except BaseException:
            # Cancelled (agent shutting down): leave no orphaned script behind.
            await _kill(proc)
            raise
        code = proc.returncode
        result = CheckResult(verdict(code), first_line(output), code)
        if result.value == UNKNOWN:
            log.info("signals.command_unknown", monitor=spec.name, exit_code=code)
        return result

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process) -> bytes:
        assert proc.stdout is not None
        # Only the first line matters; cap what we hold, but keep draining so a
        # chatty script never blocks on a full pipe.
        kept = bytearray()
        while chunk := await proc.stdout.read(65536):
            if len(kept) < MAX_OUTPUT_BYTES:
                kept += chunk[: MAX_OUTPUT_BYTES - len(kept)]
        await proc.wait()
        return bytes(kept)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    waiting = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:
        # Reap before propagating, so cancellation never leaves a zombie or an open pipe.
        await waiting
        raise

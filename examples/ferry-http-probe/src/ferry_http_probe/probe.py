"""`http_probe`: an HTTP health probe as a Ferry signal source.

Config (one entry of `signals.plugins`)::

    - type: http_probe
      name: web                         # signals http_probe.web.*
      url: http://127.0.0.1:8080/health
      interval: 5s
      timeout: 2s
      expect_status: 200

Every `interval` it GETs `url` and publishes:

- ``http_probe.<name>.up``: 1.0 when the answer came within `timeout` with
  `expect_status`, else 0.0;
- ``http_probe.<name>.status``: the HTTP status, 0 when there was no answer;
- ``http_probe.<name>.latency_seconds``: time to the response headers, only
  when there was an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.durations import Duration
from agent.model import Sample, SignalSink
from agent.signals.registry import SourceContext

log = structlog.get_logger("ferry_http_probe")


class ProbeParams(BaseModel):
    # extra="forbid": Ferry refuses plugins whose models would drop a misspelt key.
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    interval: Duration = Field(default=5.0, gt=0)
    timeout: Duration = Field(default=2.0, gt=0)
    expect_status: int = Field(default=200, ge=100, le=599)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _timeout_fits(self) -> ProbeParams:
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


class HttpProbeSource:
    """Built by Ferry as ``HttpProbeSource(context, params)``; `run` is its only work."""

    Params = ProbeParams

    def __init__(self, context: SourceContext, params: ProbeParams) -> None:
        # No I/O here: `ferry check-config` builds sources too, and never runs them.
        self.params = params
        self.clock = context.clock
        self.prefix = f"http_probe.{context.name}"
        self.name = self.prefix

    def publishes(self) -> Sequence[str]:
        return [f"{self.prefix}.up", f"{self.prefix}.status", f"{self.prefix}.latency_seconds"]

    def max_ages(self) -> dict[str, float | None]:
        # Stale (policies read "unknown") once three probes in a row are missing.
        return {f"{self.prefix}.": 3 * self.params.interval + self.params.timeout}

    async def run(self, sink: SignalSink) -> None:
        # trust_env=False: a proxy from the environment must never see the probe.
        timeout = aiohttp.ClientTimeout(total=self.params.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                started = self.clock.monotonic()
                await self.probe(session, sink)
                elapsed = self.clock.monotonic() - started
                await asyncio.sleep(max(self.params.interval - elapsed, 0.0))

    async def probe(self, session: aiohttp.ClientSession, sink: SignalSink) -> None:
        started = time.monotonic()
        status = 0
        try:
            async with session.get(self.params.url, allow_redirects=False) as resp:
                status = resp.status
                latency = time.monotonic() - started
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("http_probe.failed", probe=self.prefix, url=self.params.url, error=repr(exc))
            latency = None
        now = self.clock.time()
        up = 1.0 if status == self.params.expect_status else 0.0
        sink.publish(Sample(f"{self.prefix}.up", up, now))
        sink.publish(Sample(f"{self.prefix}.status", float(status), now))
        if latency is not None:
            sink.publish(Sample(f"{self.prefix}.latency_seconds", latency, now))

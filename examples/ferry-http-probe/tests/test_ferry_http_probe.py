"""How a plugin author tests a Ferry source and action: against a local server and fake hooks.

Everything talks to 127.0.0.1 only. Run with `pytest tests/` inside Ferry's venv.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from ferry_http_probe import EvacuateThenRun, HookParams, HttpProbeSource, ProbeParams
from pydantic import ValidationError

from agent.model import ActionResult, ContainerInfo, Decision, Sample, SystemClock
from agent.policy.actions import ActionContext
from agent.signals.registry import SourceContext


class ListSink:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.changed = asyncio.Event()

    def publish(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.changed.set()

    def publish_event(self, event: Any) -> None:
        raise AssertionError("a probe publishes no Docker events")

    def latest(self, name: str) -> float | None:
        values = [s.value for s in self.samples if s.name == name]
        return values[-1] if values else None

    async def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def local_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_params_are_checked() -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        ProbeParams(url="ftp://x")
    with pytest.raises(ValidationError, match="timeout must not exceed interval"):
        ProbeParams(url="http://127.0.0.1/", interval="1s", timeout="2s")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ProbeParams.model_validate({"url": "http://127.0.0.1/", "intervall": "1s"})
    with pytest.raises(ValidationError, match="exactly one of argv and url"):
        HookParams()
    assert ProbeParams(url="http://127.0.0.1/", interval="2s").interval == 2.0


def test_probe_publishes_up_status_and_latency_and_goes_down() -> None:
    healthy = {"status": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=healthy["status"], text="ok")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/health", health)
        async with local_server(app) as base:
            params = ProbeParams(url=f"{base}/health", interval=0.05, timeout=0.05)
            source = HttpProbeSource(SourceContext(name="web"), params)
            assert list(source.publishes()) == [
                "http_probe.web.up",
                "http_probe.web.status",
                "http_probe.web.latency_seconds",
            ]
            sink = ListSink()
            task = asyncio.create_task(source.run(sink))
            try:
                await sink.wait(lambda: sink.latest("http_probe.web.up") == 1.0)
                assert sink.latest("http_probe.web.status") == 200.0
                latency = sink.latest("http_probe.web.latency_seconds")
                assert latency is not None and 0 <= latency < 1
                healthy["status"] = 503
                await sink.wait(lambda: sink.latest("http_probe.web.up") == 0.0)
                assert sink.latest("http_probe.web.status") == 503.0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # The server is gone: no answer at all reads as down, status 0.
        sink = ListSink()
        task = asyncio.create_task(source.run(sink))
        try:
            await sink.wait(lambda: sink.latest("http_probe.web.status") == 0.0)
            assert sink.latest("http_probe.web.up") == 0.0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


class FakeHooks:
    """Stands in for the agent's migration service."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls: list[tuple[str, Decision]] = []

    async def evacuate(self, decision: Decision) -> ActionResult:
        self.calls.append(("evacuate", decision))
        pairs = zip(decision.containers, decision.targets, strict=True)
        per = {c.name: f"moved to {t}" for c, t in pairs}
        return ActionResult(ok=self.ok, message="evacuate: moved 1 of 1", per_container=per)

    async def move(self, decision: Decision) -> ActionResult:
        raise AssertionError("configured to evacuate")

    def status(self) -> dict[str, Any]:
        return {}


def context(hooks: FakeHooks) -> ActionContext:
    return ActionContext(
        name="evacuate-and-tell",
        host="node-a",
        clock=SystemClock(),
        log=structlog.get_logger("test"),
        migrations=hooks,
    )


DECISION = Decision(
    policy="web-down",
    action="evacuate-and-tell",
    containers=[ContainerInfo("c1", "web", "img", "sha", {"ferry.migrate": "true"}, "running")],
    targets=["node-b"],
    reason="when http_probe.web.up < 1",
)


def test_action_evacuates_then_runs_the_command_with_the_outcome(tmp_path: Path) -> None:
    out = tmp_path / "outcome.json"
    script = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "d['env'] = [os.environ['FERRY_POLICY'], os.environ['FERRY_OK']]; "
        f"open({str(out)!r}, 'w').write(json.dumps(d))"
    )
    hooks = FakeHooks()
    action = EvacuateThenRun(context(hooks), HookParams(argv=[sys.executable, "-c", script]))
    assert action.name == "evacuate-and-tell"
    result = asyncio.run(action.execute(DECISION))
    assert result.ok, result.message
    assert [kind for kind, _ in hooks.calls] == ["evacuate"]
    written = json.loads(out.read_text())
    assert written["containers"] == {"web": "moved to node-b"}
    assert written["host"] == "node-a" and written["env"] == ["web-down", "1"]


def test_a_failing_command_fails_the_action_but_not_the_evacuation() -> None:
    hooks = FakeHooks()
    action = EvacuateThenRun(context(hooks), HookParams(argv=[sys.executable, "-c", "exit(3)"]))
    result = asyncio.run(action.execute(DECISION))
    assert not result.ok and "exited 3" in result.message
    assert result.per_container == {"web": "moved to node-b"}


def test_action_posts_the_outcome_to_a_webhook() -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    async def scenario() -> ActionResult:
        app = web.Application()
        app.router.add_post("/hook", hook)
        async with local_server(app) as base:
            action = EvacuateThenRun(context(FakeHooks(ok=False)), HookParams(url=f"{base}/hook"))
            return await action.execute(DECISION)

    result = asyncio.run(scenario())
    assert not result.ok  # the evacuation's verdict stands
    assert "posted to" in result.message
    assert received[0]["ok"] is False and received[0]["policy"] == "web-down"

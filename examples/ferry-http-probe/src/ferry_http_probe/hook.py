"""`evacuate_then_run`: evacuate through the agent, then tell someone how it went.

Config (one entry of `actions.plugins`; a policy names it in `action:`)::

    - type: evacuate_then_run
      name: evacuate-and-page
      argv: [/usr/local/bin/page, oncall]    # or: url: http://127.0.0.1:9000/hook
      timeout: 30s

The action asks the agent's migration service to evacuate the decision's
containers (to the targets the policy placed), then runs `argv` with the
outcome as JSON on stdin, or POSTs that JSON to `url`. The outcome also goes
into the environment of `argv`: FERRY_POLICY, FERRY_HOST, FERRY_OK (1/0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.durations import Duration
from agent.model import ActionResult, Decision
from agent.policy.actions import ActionContext


class HookParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    argv: list[str] | None = Field(default=None, min_length=1)
    url: str | None = None
    timeout: Duration = Field(default=30.0, gt=0)
    migrate: Literal["evacuate", "move"] = "evacuate"

    @model_validator(mode="after")
    def _one_target(self) -> HookParams:
        if (self.argv is None) == (self.url is None):
            raise ValueError("set exactly one of argv and url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected http:// or https://, got {self.url!r}")
        return self


class EvacuateThenRun:
    """Built by Ferry as ``EvacuateThenRun(context, params)``."""

    Params = HookParams
    # The policy engine places a target per container before calling us.
    needs_target = True

    def __init__(self, context: ActionContext, params: HookParams) -> None:
        self.name = context.name  # what policies write in `action:`
        self.ctx = context
        self.params = params

    async def execute(self, decision: Decision) -> ActionResult:
        hooks = self.ctx.migrations
        moved = await (hooks.evacuate if self.params.migrate == "evacuate" else hooks.move)(
            decision
        )
        outcome = {
            "host": self.ctx.host,
            "action": self.name,
            "policy": decision.policy,
            "reason": decision.reason,
            "ok": moved.ok,
            "message": moved.message,
            "containers": moved.per_container,
        }
        try:
            told = await (self._run(outcome) if self.params.argv else self._post(outcome))
            ok = moved.ok
        except Exception as exc:  # the evacuation stands; the notification failed
            told, ok = f"notify failed: {type(exc).__name__}: {exc}", False
        self.ctx.log.info("evacuate_then_run.done", policy=decision.policy, notified=told)
        return ActionResult(
            ok=ok, message=f"{moved.message}; {told}", per_container=moved.per_container
        )

    async def _run(self, outcome: dict[str, Any]) -> str:
        assert self.params.argv is not None
        env = {
            **os.environ,
            "FERRY_POLICY": str(outcome["policy"]),
            "FERRY_HOST": self.ctx.host,
            "FERRY_OK": "1" if outcome["ok"] else "0",
        }
        proc = await asyncio.create_subprocess_exec(
            *self.params.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a timeout kills the command's whole process group
        )
        try:
            _, err = await asyncio.wait_for(
                proc.communicate(json.dumps(outcome).encode()), self.params.timeout
            )
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-200:]
            raise RuntimeError(f"{self.params.argv[0]} exited {proc.returncode}: {tail}")
        return f"ran {self.params.argv[0]}"

    async def _post(self, outcome: dict[str, Any]) -> str:
        assert self.params.url is not None
        timeout = aiohttp.ClientTimeout(total=self.params.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.post(self.params.url, json=outcome) as resp,
        ):
            if resp.status >= 300:
                raise RuntimeError(f"{self.params.url} answered {resp.status}")
            return f"posted to {self.params.url} ({resp.status})"

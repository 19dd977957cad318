"""What this host tells and refuses its peers: drain-aware peer handlers."""

from __future__ import annotations

from typing import Any

import pytest

from agent.peer.api import HandlerError
from agent.service.peer_endpoint import DrainAwareHandlers
from tests.helpers import run_async


def test_drain_aware_handlers() -> None:
    draining = {"on": False}

    class Inner:
        async def health(self) -> dict[str, Any]:
            return {"migrations_in_progress": 1, "reserved_memory_bytes": 300}

        async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
            return {"accepted": peer}

        async def abort(self, peer: str, mid: str, body: dict[str, Any]) -> dict[str, Any]:
            return {"aborted": mid}

    h = DrainAwareHandlers(
        Inner(),
        draining=lambda: draining["on"],
        drain_reason=lambda: "kernel",
        base_health=lambda: {"name": "a", "mem_available_bytes": 1000, "draining": False},
    )

    async def scenario() -> None:
        health = await h.health()
        assert health["mem_available_bytes"] == 700  # reserved memory is not available
        assert health["migrations_in_progress"] == 1 and health["draining"] is False
        assert await h.prepare("b", {}) == {"accepted": "b"}
        draining["on"] = True
        assert (await h.health())["draining"] is True
        with pytest.raises(HandlerError) as err:
            await h.prepare("b", {})
        assert err.value.status == 503 and "draining (kernel)" in err.value.reason
        assert await h.abort("b", "m1", {}) == {"aborted": "m1"}  # everything else passes through

    run_async(scenario())

"""Which event loop `ferry run` uses, and that it says so."""

from __future__ import annotations

import asyncio

import pytest

from agent import event_loop


def test_uvloop_by_default_when_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    factory, chosen = event_loop.loop_factory({})
    assert factory is uvloop.new_event_loop and chosen == "uvloop"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("asyncio", "FERRY_EVENT_LOOP=asyncio"),
        ("tokio", "FERRY_EVENT_LOOP='tokio' is not uvloop or asyncio"),
    ],
)
def test_the_environment_can_ask_for_asyncio_s_own_loop(value: str, why: str) -> None:
    factory, chosen = event_loop.loop_factory({event_loop.ENV: value})
    assert factory is None and chosen == f"asyncio ({why})"


def test_without_uvloop_the_agent_runs_on_asyncio_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    factory, chosen = event_loop.loop_factory({})
    assert factory is None and chosen.startswith("asyncio (uvloop cannot be imported")


def test_run_runs_on_the_chosen_loop_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    heard: list[str] = []

    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert event_loop.run(main, heard.append).startswith("uvloop")
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(main, heard.append).startswith("asyncio")
    assert heard == ["uvloop", "asyncio (FERRY_EVENT_LOOP=asyncio)"]

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from agent.logging import configure_logging


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.reset_defaults()
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)


def test_json_when_not_a_tty_and_level_filters() -> None:
    out = io.StringIO()
    configure_logging("warning", "auto", stream=out)
    log = structlog.get_logger("t")
    log.info("policy.pending", policy="cpu")
    log.warning("policy.action_failed", policy="cpu", reason="boom")
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "policy.action_failed"
    assert event["level"] == "warning" and event["reason"] == "boom" and "timestamp" in event


def test_console_on_a_tty() -> None:
    out = FakeTTY()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger("t").info("policy.firing", policy="cpu")
    text = out.getvalue()
    assert "policy.firing" in text and not text.lstrip().startswith("{")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml", stream=io.StringIO())


def test_library_records_are_rendered_like_ferrys_own() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger("agent.t").info("migration.phase", phase="freeze")
    logging.getLogger("urllib3.connectionpool").warning("Retrying (%s) after %s", 2, "reset")
    try:
        raise OSError("socket closed")
    except OSError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    logging.getLogger("chatty.lib").debug("below the level")

    events = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
    assert [e["event"] for e in events] == [
        "migration.phase",
        "Retrying (2) after reset",
        "Error handling request",
    ]
    assert events[0]["phase"] == "freeze" and "logger" not in events[0]
    assert events[1]["level"] == "warning" and events[1]["logger"] == "urllib3.connectionpool"
    assert "timestamp" in events[1]
    assert events[2]["level"] == "error" and "OSError: socket closed" in events[2]["exception"]


def test_configuring_again_replaces_the_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    logging.getLogger("lib").warning("once")
    assert first.getvalue() == "" and json.loads(second.getvalue())["event"] == "once"

"""structlog setup: one event per decision, JSON for machines, console for people.

``configure_logging(level, fmt)`` is called once by each entry point (``ferry
run`` with the config's ``logging`` section, CLI tools with a quieter level).
``fmt="auto"`` picks the journal when systemd connected the stream to
journald ($JOURNAL_STREAM): each event key becomes a journal field of its own
(agent/journald.py). Otherwise it picks JSON when the stream is not a TTY
(files, pipes) and the console renderer on a TTY.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.journald import JournalSender, connected_to_journal, event_fields

# Marks the handler configure_logging installs, so a second call replaces it.
_OURS = "_ferry_handler"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog (and stdlib logging from libraries) to `stream` at `level`."""
    out = stream if stream is not None else sys.stdout
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    if fmt == "auto":
        fmt = "journal" if _on_journal(out) else "console" if _isatty(out) else "json"
    if fmt == "journal":
        _configure_journal(numeric, out)
        return
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    else:
        raise ValueError(f"unknown log format {fmt!r}; use auto, json, console or journal")

    # Ferry's own events and library records (docker, aiohttp, urllib3) take the
    # same road: stdlib logging, then structlog's ProcessorFormatter on one
    # handler. Every line on the stream is rendered by the same renderer, so a
    # JSON log never carries a plain "WARNING urllib3: ..." line.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Only for library records: they name their logger, Ferry's events do not.
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)  # configured again (tests, a reload): one stream, not two
    root.addHandler(handler)
    root.setLevel(numeric)


def _on_journal(stream: TextIO) -> bool:
    fds = [2]
    with contextlib.suppress(AttributeError, ValueError, OSError):
        fds.append(stream.fileno())
    return connected_to_journal(fds)


class JournalLogger:
    """structlog's final stop under journald: sends the fields, or prints JSON if it cannot.

    A record journald does not take (socket gone while journald restarts) still
    reaches the journal as a JSON line on the stream, never lost.
    """

    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self._sender = sender
        self._fallback = fallback

    def msg(self, **fields: str) -> None:
        try:
            self._sender.send(fields)
        except OSError:
            print(json.dumps(fields), file=self._fallback, flush=True)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = msg


class JournalHandler(logging.Handler):
    """Library records (docker, aiohttp) as journal entries too, with their logger's name."""

    def __init__(self, logger: JournalLogger) -> None:
        super().__init__()
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
            if record.exc_info:
                event["exception"] = logging.Formatter().formatException(record.exc_info)
            self._logger.msg(**event_fields(event))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _journal_fields(_: Any, method: str, event: MutableMapping[str, Any]) -> dict[str, str]:
    return event_fields(event, method)


def _configure_journal(numeric: int, out: TextIO) -> None:
    sink = JournalLogger(JournalSender(), out)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _journal_fields,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    handler = JournalHandler(sink)
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

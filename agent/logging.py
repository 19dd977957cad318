"""structlog setup: one event per decision, JSON for machines, console for people.

``configure_logging(level, fmt)`` is called once by each entry point (``ferry
run`` with the config's ``logging`` section, CLI tools with a quieter level).
``fmt="auto"`` picks JSON when the stream is not a TTY (journald, files,
pipes) and the console renderer on a TTY.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

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
        fmt = "console" if _isatty(out) else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    else:
        raise ValueError(f"unknown log format {fmt!r}; use auto, json or console")

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


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

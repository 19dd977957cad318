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

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries (docker, aiohttp) log through stdlib; keep them on the same stream and level.
    logging.basicConfig(stream=out, level=numeric, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(numeric)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

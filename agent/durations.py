"""Human durations: "500ms", "5s", "1m30s", "2h", "1d"; plain numbers are seconds.

`Duration` is a pydantic-ready float of seconds, so config and policy models
declare ``timeout: Duration = 30.0`` and accept either spelling.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# No duration Ferry reads means more than a year; anything longer is a typo that would
# overflow the event loop's timers, not a setting.
MAX_SECONDS = 366 * 86400.0
_HINT = "use a number of seconds or units ms, s, m, h, d (e.g. 500ms, 30s, 1m30s, 2h)"


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`; ValueError with a hint if it is not a duration."""
    if isinstance(value, bool):  # bool is an int; `true` is never meant as 1s
        raise ValueError(f"invalid duration {_shown(value)}: {_HINT}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise ValueError(f"invalid duration {_shown(value)}: {_HINT}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {_shown(value)}: must be a finite, non-negative time")
    if seconds > MAX_SECONDS:
        raise ValueError(f"invalid duration {_shown(value)}: longer than a year")
    return seconds


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _parse_text(value: str) -> float:
    text = value.strip().lower()
    if not text:
        raise ValueError(f"invalid duration {_shown(value)}: {_HINT}")
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    last_rank = -1.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        scale = _UNITS[match.group(2)]
        # Units must go from large to small, each once: "1m30s" yes, "30s1m" no.
        if last_rank >= 0 and scale >= last_rank:
            raise ValueError(
                f"invalid duration {_shown(value)}: units must go from largest to smallest"
            )
        last_rank = scale
        total += float(match.group(1)) * scale
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {_shown(value)}: {_HINT}")
    return total


def format_duration(seconds: float) -> str:
    """Short human form, the inverse of parse_duration for whole units: 90 -> "1m30s"."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out = ""
    rest = seconds
    for unit, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        whole = int(rest // scale)
        if whole:
            out += f"{whole}{unit}"
            rest -= whole * scale
    if rest:
        out += f"{rest:g}s"
    return out


def _validate(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[
    float,
    BeforeValidator(_validate),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]

"""Bad-input reporting shared by every part of Ferry.

Anything a user wrote (config, policies, timelines, arguments, environment)
is checked up front and every problem is reported at once, one line each,
naming the file and the key: ``config.yaml: peers[1].address: field required``.
The CLI prints ``InputError.lines()`` and exits 2; nobody shows a traceback
for a typo.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input: where it is and why it is wrong."""

    file: str  # a path as the user gave it, or e.g. "$FERRY__LIMITS__X" for the environment
    key: str  # dotted key path, e.g. "peers[1].address"; "" when not tied to a key
    reason: str
    line: int | None = None  # only when the key path cannot say where (YAML syntax)

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [one_line(p) for p in (where, self.key) if p]
        return ": ".join([*parts, one_line(self.reason)])


_MAX_PART = 300


def one_line(text: str) -> str:
    """`text` as one printable line of bounded length: what a user typed may hold anything."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: _MAX_PART + 1])
    return shown.strip() if len(shown) <= _MAX_PART else shown[:_MAX_PART].strip() + "..."


class InputError(Exception):
    """Bad input: carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]

    @classmethod
    def single(cls, file: str, key: str, reason: str, line: int | None = None) -> InputError:
        return cls([Problem(file, key, reason, line)])


def format_loc(loc: Sequence[int | str]) -> str:
    """('peers', 1, 'address') -> 'peers[1].address'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("~"):
            continue  # internal union tags (see agent.policy.conditions) say nothing to users
        else:
            out += f".{part}" if out else str(part)
    return out


_PREFIXES = ("Value error, ", "Assertion failed, ")


def _reason(err: Any) -> str:
    msg: str = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "field required"
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if msg and msg[0].isupper() and not msg[:2].isupper():
        msg = msg[0].lower() + msg[1:]
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        shown = err["input"]
        if isinstance(shown, str | int | float | bool) and len(repr(shown)) <= 60:
            msg = f"{msg} (got {shown!r})"
    return msg


def problems_from_validation(
    file: str,
    exc: ValidationError,
    prefix: Sequence[int | str] = (),
    rename: Any = None,
) -> list[Problem]:
    """Turn a pydantic error into one Problem per failing key.

    `rename(loc) -> (file, loc)` lets callers say where a value really came
    from (an environment variable, a policy by name).
    """
    problems = []
    for err in exc.errors():
        loc: tuple[int | str, ...] = (*prefix, *err["loc"])
        where = file
        if rename is not None:
            where, loc = rename(loc)
        problems.append(Problem(where, format_loc(loc), _reason(err)))
    return problems

"""The condition language of a policy's ``when`` and ``clear_when``.

Leaves::

    {signal: psi.cpu.some.avg10, op: ">", value: 50}
    {marker: drain, present: true}            # reads signal marker.drain (1.0 / 0.0)
    {event: oom, count_gte: 3, within: 10m}   # Docker events in the last 10 minutes

Combinators: ``all: [...]``, ``any: [...]``, ``not: {...}``.

Evaluation is three-valued: a signal never seen (or stale) is *unknown*
(None), not false, so ``not: {signal: ...}`` does not fire just because a
source is down. The engine treats an unknown ``when`` as not true and an
unknown ``clear_when`` as not clear.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from agent.durations import Duration, format_duration
from agent.input_bounds import DAY, count_in, duration_in
from agent.model import SignalView
from agent.policy.known_signals import is_known_signal, signal_range, suggest

_MARKER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}

# Validation context keys; the loader fills them from the config when it has one.
CTX_SIGNALS = "known_signals"
CTX_MARKERS = "known_markers"
CTX_PEERS = "known_peers"
CTX_ACTIONS = "known_actions"


@dataclass(frozen=True)
class EvalContext:
    signals: SignalView
    now: float  # wall-clock seconds, for event windows


class _Cond(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    def evaluate(self, ctx: EvalContext) -> bool | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def signal_names(self) -> set[str]:
        return set()


class SignalCondition(_Cond):
    signal: str
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: float

    @field_validator("signal")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        patterns = (info.context or {}).get(CTX_SIGNALS)
        if not is_known_signal(name, patterns):
            hint = suggest(name, patterns)
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise ValueError(f"unknown signal {name!r}{extra}")
        return name

    @field_validator("value")
    @classmethod
    def _in_range(cls, value: float, info: ValidationInfo) -> float:
        name = info.data.get("signal")
        known = signal_range(name) if isinstance(name, str) else None
        if known is None:
            return value
        lo, hi, what = known
        if lo <= value <= hi:
            return value
        hint = ""
        if hi == 1.0 and what.startswith("a ratio") and 1 < value <= 100:
            hint = f" (a percentage? {value:g}% is {value / 100:g})"
        raise ValueError(f"{name} is {what}; {value:g} is outside that{hint}")

    def evaluate(self, ctx: EvalContext) -> bool | None:
        current = ctx.signals.value(self.signal)
        if current is None:
            return None
        return _OPS[self.op](current, self.value)

    def describe(self) -> str:
        return f"{self.signal} {self.op} {self.value:g}"

    def signal_names(self) -> set[str]:
        return {self.signal}


class MarkerCondition(_Cond):
    marker: str
    present: bool = True

    @field_validator("marker")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        if not _MARKER_NAME.match(name):
            raise ValueError(f"marker name {name!r}: use lower-case letters, digits, _ and -")
        known = (info.context or {}).get(CTX_MARKERS)
        if known is not None and name not in known:
            raise ValueError(
                f"unknown marker {name!r}; the config defines: {', '.join(sorted(known))}"
            )
        return name

    @property
    def signal(self) -> str:
        return f"marker.{self.marker}"

    def evaluate(self, ctx: EvalContext) -> bool | None:
        current = ctx.signals.value(self.signal)
        if current is None:
            return None
        return (current >= 0.5) == self.present

    def describe(self) -> str:
        return f"marker {self.marker} {'present' if self.present else 'absent'}"

    def signal_names(self) -> set[str]:
        return {self.signal}


class EventCondition(_Cond):
    event: str = Field(min_length=1, max_length=100)
    count_gte: Annotated[int, count_in(1, 1_000_000)] = 1
    within: Annotated[Duration, duration_in(0, 30 * DAY, lo_open=True)]

    def evaluate(self, ctx: EvalContext) -> bool | None:
        return ctx.signals.event_count(self.event, ctx.now - self.within) >= self.count_gte

    def describe(self) -> str:
        return f"{self.count_gte}+ {self.event} events within {format_duration(self.within)}"


class AllCondition(_Cond):
    all: list[Condition] = Field(min_length=1)

    def evaluate(self, ctx: EvalContext) -> bool | None:
        results = [c.evaluate(ctx) for c in self.all]
        if any(r is False for r in results):
            return False
        return None if any(r is None for r in results) else True

    def describe(self) -> str:
        return "(" + " and ".join(c.describe() for c in self.all) + ")"

    def signal_names(self) -> set[str]:
        return set().union(*(c.signal_names() for c in self.all))


class AnyCondition(_Cond):
    any: list[Condition] = Field(min_length=1)

    def evaluate(self, ctx: EvalContext) -> bool | None:
        results = [c.evaluate(ctx) for c in self.any]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False

    def describe(self) -> str:
        return "(" + " or ".join(c.describe() for c in self.any) + ")"

    def signal_names(self) -> set[str]:
        return set().union(*(c.signal_names() for c in self.any))


class NotCondition(_Cond):
    not_: Condition = Field(alias="not")

    def evaluate(self, ctx: EvalContext) -> bool | None:
        result = self.not_.evaluate(ctx)
        return None if result is None else not result

    def describe(self) -> str:
        return f"not {self.not_.describe()}"

    def signal_names(self) -> set[str]:
        return self.not_.signal_names()


_KINDS = ("signal", "marker", "event", "all", "any", "not")
_BY_CLASS: dict[type, str] = {}


def _kind(value: Any) -> str | None:
    # Tags start with "~" so error paths drop them (agent.errors.format_loc).
    if isinstance(value, dict):
        keys = [k for k in _KINDS if k in value]
        return f"~{keys[0]}" if len(keys) == 1 else None
    return _BY_CLASS.get(type(value))


Condition = Annotated[
    Annotated[SignalCondition, Tag("~signal")]
    | Annotated[MarkerCondition, Tag("~marker")]
    | Annotated[EventCondition, Tag("~event")]
    | Annotated[AllCondition, Tag("~all")]
    | Annotated[AnyCondition, Tag("~any")]
    | Annotated[NotCondition, Tag("~not")],
    Discriminator(
        _kind,
        custom_error_type="condition_kind",
        custom_error_message=(
            "a condition needs exactly one of: signal, marker, event, all, any, not"
        ),
    ),
]

_BY_CLASS.update(
    {
        SignalCondition: "~signal",
        MarkerCondition: "~marker",
        EventCondition: "~event",
        AllCondition: "~all",
        AnyCondition: "~any",
        NotCondition: "~not",
    }
)

for _model in (AllCondition, AnyCondition, NotCondition):
    _model.model_rebuild()

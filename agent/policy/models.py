"""Policy file schema. A file holds ``policies: [...]``; every key is checked.

See policies/*.yaml for commented examples of each field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.durations import Duration, format_duration
from agent.input_bounds import DAY, count_in, duration_in
from agent.policy.conditions import CTX_ACTIONS, CTX_PEERS, Condition

OPT_IN_LABEL = "ferry.migrate"
PRIORITY_LABEL = "ferry.priority"

# Actions that move containers and therefore need a target peer per container.
MIGRATING_ACTIONS = frozenset({"evacuate", "move"})


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


# A glob or label that is empty matches nothing, or everything: never what was meant.
_Text = Annotated[str, Field(min_length=1, max_length=253)]


class Match(_Model):
    """Which containers a rule matches; every given field must hold."""

    labels: dict[_Text, str] = {}
    has_labels: list[_Text] = []
    name: _Text | None = None  # glob, e.g. "web-*"
    image: _Text | None = None  # glob, e.g. "redis:*"

    def is_empty(self) -> bool:
        return not (self.labels or self.has_labels or self.name or self.image)


class Selector(Match):
    exclude: Match | None = None
    # Containers must carry ferry.migrate=true unless a policy says otherwise on purpose.
    require_opt_in: bool = True


class RateLimit(_Model):
    max: Annotated[int, count_in(1, 100_000)]
    per: Annotated[Duration, duration_in(0, 366 * DAY, lo_open=True)]


def _targets_shorthand(value: Any) -> Any:
    # `targets: any` and `targets: [b, c]` are common enough to allow.
    if isinstance(value, str | list):
        return {"peers": value}
    return value


MAX_AMOUNT = 100_000


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _amount(value: Any) -> Any:
    # One message instead of one per union member ("literal['all']", "int").
    if value is None or value == "all":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected `all` or a number of containers, got {_shown(value)}")
    if not 1 <= value <= MAX_AMOUNT:
        raise ValueError(f"must be `all` or between 1 and {MAX_AMOUNT} (got {value})")
    return value


def _peer_list(value: Any) -> Any:
    if value == "any":
        return value
    if isinstance(value, list) and all(isinstance(p, str) and p for p in value):
        return value
    raise ValueError(f"expected `any` or a list of peer names, got {_shown(value)}")


class Targets(_Model):
    peers: Annotated[Literal["any"] | list[str], PlainValidator(_peer_list)] = "any"
    placement: Literal["least_loaded", "weighted", "spread"] = "least_loaded"

    @field_validator("peers")
    @classmethod
    def _known(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list names no peer; list peers or write `any`")
            dupes = sorted({p for p in value if value.count(p) > 1})
            if dupes:
                raise ValueError(f"peer(s) listed twice: {', '.join(dupes)}")
        known = (info.context or {}).get(CTX_PEERS)
        if known is not None and isinstance(value, list):
            unknown = [p for p in value if p not in known]
            if unknown:
                raise ValueError(
                    f"unknown peer(s) {', '.join(unknown)}; the config lists: "
                    f"{', '.join(sorted(known)) or 'none'}"
                )
        return value


class Policy(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    when: Condition
    for_: Annotated[Duration, duration_in(0, 30 * DAY)] = Field(default=0.0, alias="for")
    clear_when: Condition | None = None
    keep_firing_for: Annotated[Duration, duration_in(0, 30 * DAY)] = 0.0
    cooldown: Annotated[Duration, duration_in(0, 30 * DAY)] = 300.0
    rate_limit: RateLimit | None = None
    max_concurrent: Annotated[int, count_in(1, 64)] = 1
    dry_run: bool = False
    select: Selector = Selector()
    order: Literal["priority", "memory_asc", "memory_desc"] = "priority"
    # None: "all" for evacuate, 1 for everything else.
    amount: Annotated[Literal["all"] | int | None, PlainValidator(_amount)] = None
    action: str = Field(min_length=1, max_length=100)
    targets: Annotated[Targets, BeforeValidator(_targets_shorthand)] = Targets()

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get(CTX_ACTIONS)
        if known is not None and value not in known:
            raise ValueError(f"unknown action {value!r}; known: {', '.join(sorted(known))}")
        return value

    @model_validator(mode="after")
    def _default_amount(self) -> Policy:
        if self.amount is None:
            object.__setattr__(self, "amount", "all" if self.action == "evacuate" else 1)
        return self

    @property
    def count(self) -> int | None:
        """How many containers to act on per firing; None = all selected."""
        return None if self.amount == "all" else int(self.amount or 1)

    def summary(self) -> str:
        """One line: trigger -> action, for check-config output and logs."""
        trigger = f"when {self.when.describe()}"
        if self.for_:
            trigger += f" for {format_duration(self.for_)}"
        what = f"{self.action} {self.amount}"
        if self.action in MIGRATING_ACTIONS:
            peers = (
                self.targets.peers
                if isinstance(self.targets.peers, str)
                else ",".join(self.targets.peers)
            )
            what += f" -> {peers} ({self.targets.placement})"
        flags = " [dry-run]" if self.dry_run else ""
        return f"{trigger} => {what}{flags}"


class PolicyFile(_Model):
    policies: list[Policy] = Field(min_length=1)

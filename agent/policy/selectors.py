"""Which of this host's containers a firing policy acts on, and in what order."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable

from agent.model import ContainerInfo
from agent.policy.models import OPT_IN_LABEL, PRIORITY_LABEL, Match, Policy, Selector

_TRUE = frozenset({"true", "1", "yes", "on"})


def _name(container: ContainerInfo) -> str:
    return container.name.lstrip("/")  # the Docker API prefixes names with "/"


def matches(rule: Match, container: ContainerInfo) -> bool:
    labels = container.labels
    if any(labels.get(k) != v for k, v in rule.labels.items()):
        return False
    if any(k not in labels for k in rule.has_labels):
        return False
    if rule.name is not None and not fnmatch.fnmatchcase(_name(container), rule.name):
        return False
    return rule.image is None or fnmatch.fnmatchcase(container.image, rule.image)


def opted_in(container: ContainerInfo) -> bool:
    return container.labels.get(OPT_IN_LABEL, "").strip().lower() in _TRUE


def select(
    selector: Selector, containers: Iterable[ContainerInfo], busy: Collection[str] = ()
) -> list[ContainerInfo]:
    """Running containers the selector matches, minus exclusions and ones already being acted on."""
    chosen = []
    for c in containers:
        if c.state != "running" or c.id in busy:
            continue
        if selector.require_opt_in and not opted_in(c):
            continue
        if not matches(selector, c):
            continue
        exclude = selector.exclude
        if exclude is not None and not exclude.is_empty() and matches(exclude, c):
            continue
        chosen.append(c)
    return chosen


def priority(container: ContainerInfo) -> float:
    """ferry.priority as a number; unlabelled or unparsable counts as 0."""
    try:
        return float(container.labels.get(PRIORITY_LABEL, "0"))
    except ValueError:
        return 0.0


def order(policy_order: str, containers: Iterable[ContainerInfo]) -> list[ContainerInfo]:
    """Sorted so the containers to act on first come first; ties broken by name for stability."""
    items = list(containers)
    if policy_order == "priority":
        return sorted(items, key=lambda c: (priority(c), _name(c)))
    if policy_order == "memory_asc":
        return sorted(items, key=lambda c: (c.memory_bytes, _name(c)))
    if policy_order == "memory_desc":
        return sorted(items, key=lambda c: (-c.memory_bytes, _name(c)))
    raise ValueError(f"unknown order {policy_order!r}")


def pick(
    policy: Policy,
    containers: Iterable[ContainerInfo],
    busy: Collection[str] = (),
    budget: int | None = None,
) -> list[ContainerInfo]:
    """select -> order -> amount (capped by `budget`, the global rate cap's remainder)."""
    ordered = order(policy.order, select(policy.select, containers, busy))
    count = policy.count
    if budget is not None:
        count = budget if count is None else min(count, budget)
    return ordered if count is None else ordered[:count]

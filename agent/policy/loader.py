"""Read policy files from a directory (or one file) and report every problem at once."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import InputError, Problem, problems_from_validation
from agent.policy.conditions import CTX_ACTIONS, CTX_MARKERS, CTX_PEERS, CTX_SIGNALS
from agent.policy.models import Policy, PolicyFile
from agent.yaml_input import read_yaml

POLICY_SUFFIXES = (".yaml", ".yml")


def policy_files(path: Path) -> list[Path]:
    """The files a policy directory holds; subdirectories (e.g. tests/) are not policies."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
    return [path]


def load_policies(
    path: str | Path,
    *,
    known_signals: Sequence[str] | None = None,
    known_markers: Collection[str] | None = None,
    known_peers: Collection[str] | None = None,
    known_actions: Collection[str] | None = None,
) -> list[Policy]:
    """Every policy under `path`, validated; InputError lists all problems found.

    The ``known_*`` arguments tighten checks when the caller knows more (the
    config's markers and peers, the registered actions); None skips that check.
    """
    root = Path(path)
    if not root.exists():
        raise InputError.single(str(path), "", "no such file or directory")
    context = {
        CTX_SIGNALS: known_signals,
        CTX_MARKERS: known_markers,
        CTX_PEERS: known_peers,
        CTX_ACTIONS: known_actions,
    }
    problems: list[Problem] = []
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for file in policy_files(root):
        shown = str(file)
        try:
            loaded = _load_file(file, shown, context)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        for policy in loaded:
            key = f"policies[{policy.name}]"
            if policy.name in seen:
                problems.append(
                    Problem(
                        shown, f"{key}.name", f"duplicate policy name (also in {seen[policy.name]})"
                    )
                )
            seen.setdefault(policy.name, shown)
            policies.append(policy)
    if problems:
        raise InputError(problems)
    return policies


def _load_file(file: Path, shown: str, context: dict[str, Any]) -> list[Policy]:
    raw = read_yaml(file, shown)
    if not isinstance(raw, dict) or "policies" not in raw:
        raise InputError.single(shown, "", "expected a mapping with a `policies:` list")
    names = _names_by_index(raw)

    def rename(loc: tuple[int | str, ...]) -> tuple[str, tuple[int | str, ...]]:
        # Name policies by name, not position: "policies[cpu-pressure].for".
        if len(loc) >= 2 and loc[0] == "policies" and isinstance(loc[1], int):
            name = names.get(loc[1])
            if name is not None:
                return shown, (f"policies[{name}]", *loc[2:])
        return shown, loc

    try:
        return PolicyFile.model_validate(raw, context=context).policies
    except ValidationError as exc:
        raise InputError(problems_from_validation(shown, exc, rename=rename)) from None


def _names_by_index(raw: dict[str, Any]) -> dict[int, str]:
    items = raw.get("policies")
    if not isinstance(items, list):
        return {}
    return {
        i: item["name"]
        for i, item in enumerate(items)
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]
    }

"""Turn the config's `signals.plugins` and `actions.plugins` into sources and actions.

`ferry run`, `ferry check-config`, `ferry check-policies --config` and
`ferry test-policy --config` all go through `load_plugins`, so what the checks
accept is what the agent runs. Every problem is reported at once, naming the
file and the key (``config.yaml: signals.plugins[0].url: field required``).

A source declares the signal names it publishes (`publishes()`); those become
names policies may use, and the agent drops any other sample it publishes. A
declared name under a built-in prefix (``load.``, ``mem.``, ...), or one
that overlaps another plugin's, is an error: two writers of one signal would
make a policy read whichever published last.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import structlog
from pydantic import ValidationError

from agent.config import FerryConfig
from agent.errors import InputError, Problem, problems_from_validation
from agent.model import Action, SystemClock
from agent.plugin_registry import PluginError
from agent.policy.actions import (
    BUILTIN_ACTIONS,
    ActionContext,
    ActionFactories,
    NoMigrations,
    default_action_factories,
)
from agent.policy.known_signals import BUILTIN_SIGNAL_PATTERNS
from agent.signals.registry import (
    GuardedSource,
    PluginSource,
    SourceContext,
    SourceRegistry,
    default_registry,
)

T = TypeVar("T")

# The first part of every built-in name: a plugin's names must start elsewhere, so
# `mem.gpu.*` from a plugin cannot be mistaken for (or shadow) Ferry's own.
_BUILTIN_PREFIXES = frozenset(p.split(".", 1)[0] for p in BUILTIN_SIGNAL_PATTERNS)

# Dotted lower-case, globs allowed after a literal first part: "http_probe.web.*".
_DECLARED = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_*?-]+)+$")


@dataclass
class Plugins:
    """The configured plugins, built but not started."""

    sources: list[GuardedSource] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    declared: dict[str, list[str]] = field(default_factory=dict)  # source name -> its names

    def signal_patterns(self) -> list[str]:
        """Every name a policy may use: the built-ins and what the plugins declared."""
        return [*BUILTIN_SIGNAL_PATTERNS, *(p for ps in self.declared.values() for p in ps)]

    def action_names(self) -> set[str]:
        return {*BUILTIN_ACTIONS, *(a.name for a in self.actions)}


def overlaps(a: str, b: str) -> bool:
    """Whether two signal names or glob patterns can name the same signal."""
    return fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def load_plugins(
    cfg: FerryConfig,
    file: str,
    sources: SourceRegistry,
    actions: ActionFactories,
    source_context: SourceContext,
    action_context: Callable[[str], ActionContext],
) -> Plugins:
    """Build every configured plugin; InputError lists every problem found.

    `action_context(name)` gives the context for the action configured as `name`.
    """
    problems: list[Problem] = []
    out = Plugins()
    for i, spec in enumerate(cfg.signals.plugins):
        where = f"signals.plugins[{i}]"
        source = _build(
            problems,
            file,
            where,
            partial(sources.create_plugin, spec.type, spec.name, spec.params(), source_context),
        )
        if source is None:
            continue
        declared = _declared(problems, file, where, source)
        if declared is None:
            continue
        for name in declared:
            for other_source, others in out.declared.items():
                if clash := next((o for o in others if overlaps(name, o)), None):
                    problems.append(
                        Problem(
                            file,
                            where,
                            f"declared signal {name!r} clashes with {clash!r} "
                            f"of signal plugin {other_source!r}",
                        )
                    )
        out.declared[spec.name] = declared
        out.sources.append(GuardedSource(source, _matcher(declared)))
    for i, spec in enumerate(cfg.actions.plugins):
        where = f"actions.plugins[{i}]"
        if spec.name in BUILTIN_ACTIONS:
            problems.append(
                Problem(file, f"{where}.name", f"{spec.name!r} is a built-in action's name")
            )
            continue
        action = _build(
            problems,
            file,
            where,
            partial(actions.create, spec.type, spec.params(), action_context(spec.name)),
        )
        if action is not None:
            out.actions.append(action)
    if problems:
        raise InputError(problems)
    return out


def _build(problems: list[Problem], file: str, where: str, make: Callable[[], T]) -> T | None:
    try:
        return make()
    except ValidationError as exc:
        problems.extend(problems_from_validation(file, exc, prefix=(where,)))
    except PluginError as exc:
        key = f"{where}.{exc.key}" if exc.key else where
        problems.append(Problem(file, key, exc.reason))
    return None


def _declared(
    problems: list[Problem], file: str, where: str, source: PluginSource
) -> list[str] | None:
    try:
        declared = [str(n) for n in source.publishes()]
    except Exception as exc:
        problems.append(Problem(file, where, f"publishes() failed: {type(exc).__name__}: {exc}"))
        return None
    bad = False
    if not declared:
        problems.append(Problem(file, where, f"source {source.name!r} declares no signal names"))
        bad = True
    for name in declared:
        if not _DECLARED.match(name):
            reason = f"declared signal {name!r} is not a dotted lower-case name"
        elif (prefix := name.split(".", 1)[0]) in _BUILTIN_PREFIXES:
            reason = (
                f"declared signal {name!r} clashes with the built-in signals "
                f"{prefix}.*; publish under the plugin's own prefix"
            )
        else:
            continue
        problems.append(Problem(file, where, reason))
        bad = True
    return None if bad else declared


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plugins_for_checks(cfg: FerryConfig, file: str) -> Plugins:
    """`load_plugins` as `ferry check-config` and friends run it: built, never started,
    with no Docker and no migration service behind the contexts."""
    log = structlog.get_logger("ferry.plugins")
    return load_plugins(
        cfg,
        file,
        default_registry(plugins=bool(cfg.signals.plugins)),
        default_action_factories(plugins=bool(cfg.actions.plugins)),
        SourceContext(
            data_root=cfg.docker.data_root or Path("/var/lib/docker"),
            interval=cfg.signals.poll_interval,
            host=cfg.name,
        ),
        lambda name: ActionContext(
            name=name,
            host=cfg.name,
            clock=SystemClock(),
            log=log.bind(plugin=name),
            migrations=NoMigrations("a configuration check does not migrate"),
        ),
    )

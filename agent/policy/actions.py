"""The explicit registry of actions policies can trigger, and the built-in ``log`` action.

The runtime builds one registry, registers the migration engine's
``evacuate``/``move`` actions, optionally loads third-party actions from the
``ferry.actions`` entry point group, and hands it to the PolicyEngine. There
is no module-level registry, so tests and ``ferry test-policy`` build their own.

An action may set ``needs_target = False`` (as ``log`` does) when it does not
move containers; the engine then skips placement and the global migration
caps for it. Without the attribute an action is assumed to need targets.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import structlog

from agent.model import Action, ActionResult, Decision

ENTRY_POINT_GROUP = "ferry.actions"

log = structlog.get_logger("ferry.actions")


def needs_target(action: Action) -> bool:
    return bool(getattr(action, "needs_target", True))


class LogAction:
    """Records what a policy decided and does nothing else; useful for trying a policy live."""

    name = "log"
    needs_target = False

    async def execute(self, decision: Decision) -> ActionResult:
        names = [c.name for c in decision.containers]
        log.info(
            "action.log",
            policy=decision.policy,
            containers=names,
            targets=decision.targets,
            reason=decision.reason,
        )
        return ActionResult(ok=True, message=f"logged {len(names)} container(s)")


class DryRunAction:
    """Stands in for an action that is not available here (e.g. migration in test-policy)."""

    def __init__(self, name: str, needs_target: bool = True) -> None:
        self.name = name
        self.needs_target = needs_target

    async def execute(self, decision: Decision) -> ActionResult:
        raise RuntimeError(f"action {self.name!r} is a dry-run stand-in and must not run")


class ActionRegistry:
    def __init__(self, actions: Iterable[Action] = ()) -> None:
        self._actions: dict[str, Action] = {}
        for action in actions:
            self.register(action)

    @classmethod
    def with_builtins(cls) -> ActionRegistry:
        return cls([LogAction()])

    def register(self, action: Action, *, replace: bool = False) -> None:
        if not isinstance(action, Action):
            raise TypeError(f"{action!r} is not an Action (needs .name and async .execute)")
        if action.name in self._actions and not replace:
            raise ValueError(f"action {action.name!r} is already registered")
        self._actions[action.name] = action

    def get(self, name: str) -> Action:
        try:
            return self._actions[name]
        except KeyError:
            raise KeyError(
                f"no action named {name!r}; registered: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._actions

    def names(self) -> list[str]:
        return sorted(self._actions)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
        """Register third-party actions; returns {entry point: problem} for those that failed.

        An entry point may name an Action instance, an Action class, or a
        zero-argument factory returning an Action. A broken plugin is reported,
        not fatal: the built-in actions still work.
        """
        failed: dict[str, str] = {}
        for ep in entry_points(group=group):
            try:
                obj: Any = ep.load()
                # Check for a class first: a class has .name and .execute too.
                action = obj() if isinstance(obj, type) or not isinstance(obj, Action) else obj
                self.register(action)
            except Exception as exc:
                failed[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning("action.plugin_failed", entry_point=ep.name, error=failed[ep.name])
        return failed

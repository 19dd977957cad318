"""The explicit registry of actions policies can trigger, and the built-in ``log`` action.

The runtime builds one registry, registers the migration engine's
``evacuate``/``move`` actions and the third-party actions the config names
under ``actions.plugins`` (built by factories from the ``ferry.actions`` entry
point group, see agent/plugin_loader.py), and hands it to the PolicyEngine.
There is no module-level registry, so tests and ``ferry test-policy`` build
their own.

An action may set ``needs_target = False`` (as ``log`` does) when it does not
move containers; the engine then skips placement and the global migration
caps for it. Without the attribute an action is assumed to need targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.model import Action, ActionResult, Clock, Decision
from agent.plugin_registry import FactoryRegistry, PluginError, factory_problem, validate_params

ENTRY_POINT_GROUP = "ferry.actions"

log = structlog.get_logger("ferry.actions")


BUILTIN_ACTIONS = frozenset({"evacuate", "move", "log"})


class MigrationHooks(Protocol):
    """What the agent's migration service offers an action plugin.

    ``evacuate``/``move`` run a decision through the same evacuator as the
    built-in actions (targets re-checked, stuck containers retried); the
    decision's ``targets`` were placed by the policy engine when the action
    declares ``needs_target = True``.
    """

    async def evacuate(self, decision: Decision) -> ActionResult: ...

    async def move(self, decision: Decision) -> ActionResult: ...

    def status(self) -> dict[str, Any]: ...


class NoMigrations:
    """The hooks where nothing may migrate (`ferry check-config`, `ferry test-policy`)."""

    def __init__(self, why: str = "migrations are not available here") -> None:
        self._why = why

    async def evacuate(self, decision: Decision) -> ActionResult:
        raise RuntimeError(self._why)

    async def move(self, decision: Decision) -> ActionResult:
        raise RuntimeError(self._why)

    def status(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ActionContext:
    """What the agent offers an action besides its own parameters."""

    name: str  # the instance name from the config; policies use it as `action:`
    host: str  # this agent's name (the config's `name`)
    clock: Clock
    log: Any  # a structlog logger bound with plugin=<name>
    migrations: MigrationHooks


ActionFactory = Callable[..., Action]


class ActionFactories(FactoryRegistry[ActionFactory]):
    """Action plugin factories by type name, from the ``ferry.actions`` entry point group."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP, "action")

    def create(self, kind: str, raw_params: Mapping[str, Any], context: ActionContext) -> Action:
        """Build a configured action; raises PluginError or pydantic's ValidationError.

        Building must not start anything: `ferry check-config` builds actions too.
        """
        factory = self.factory(kind)
        problem = factory_problem(factory)
        if problem is not None:
            raise PluginError(f"action plugin {kind!r} ({self.origin(kind)}): {problem}")
        params = validate_params(factory, raw_params)
        try:
            action = factory(context, params)
        except Exception as exc:
            raise PluginError(
                f"action plugin {kind!r} refused its parameters: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(action, Action):
            raise PluginError(
                f"action plugin {kind!r} ({self.origin(kind)}) returned "
                f"{type(action).__name__}, which has no `name` and `async execute(decision)`"
            )
        if action.name != context.name:
            raise PluginError(
                f"action plugin {kind!r} named its action {action.name!r}; "
                f"it must use the configured name (context.name = {context.name!r})"
            )
        return action


def default_action_factories(*, plugins: bool = True) -> ActionFactories:
    """A new factory registry with the installed ``ferry.actions`` plugins."""
    factories = ActionFactories()
    if plugins:
        factories.load_entry_points()
    return factories


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

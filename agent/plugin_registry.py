"""Factories by type name, from Ferry itself or from `ferry.*` entry points.

Signal sources (`ferry.signals`) and actions (`ferry.actions`) plug in the
same way: an entry point names a *factory*, a callable with a ``Params``
attribute (a pydantic model with ``extra="forbid"``). The config names a
factory by ``type`` and gives its parameters; Ferry validates them with
``Params`` and calls ``factory(context, params)``. See docs/plugins.md.

There is no module-level registry: whoever needs one builds it, so tests and
embedders never share hidden state.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import structlog
from pydantic import BaseModel

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

BUILTIN = "builtin"


class PluginError(Exception):
    """A plugin cannot be used as configured; `key` is relative to its config entry."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


class FactoryRegistry(Generic[F]):
    """Factories by type name, each with where it came from (``builtin`` or its entry point)."""

    def __init__(self, group: str, what: str) -> None:
        self.group = group
        self.what = what  # "signal source", "action": how errors name the kind
        self._factories: dict[str, F] = {}
        self._origin: dict[str, str] = {}
        self._broken: dict[str, str] = {}  # entry point name -> why it could not load

    def register(self, name: str, factory: F, *, origin: str = BUILTIN) -> None:
        """Add a factory; a name can be registered once (like duplicate collectors)."""
        if name in self._factories:
            raise PluginError(f"{self.what} {name!r} already registered (by {self._origin[name]})")
        self._factories[name] = factory
        self._origin[name] = origin
        self._broken.pop(name, None)

    def unregister(self, name: str) -> None:
        self._factories.pop(name, None)
        self._origin.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def origin(self, name: str) -> str:
        return self._origin[name]

    def is_builtin(self, name: str) -> bool:
        return self._origin.get(name) == BUILTIN

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def factory(self, kind: str) -> F:
        try:
            return self._factories[kind]
        except KeyError:
            pass
        if kind in self._broken:
            raise PluginError(f"{self.what} plugin {kind!r} failed to load: {self._broken[kind]}")
        plugins = [n for n in self.names() if not self.is_builtin(n)]
        raise PluginError(
            f"unknown {self.what} type {kind!r}; installed plugins: "
            f"{', '.join(plugins) or f'none (no {self.group!r} entry points)'}",
            key="type",
        )

    def load_entry_points(self, group: str | None = None) -> list[str]:
        """Register every plugin in the entry-point group; returns the names added.

        A broken or clashing plugin is logged and skipped, and remembered: one bad
        package must not stop the agent, unless the config asks for that very plugin
        (then `factory()` says why it is missing).
        """
        group = group or self.group
        added: list[str] = []
        for ep in importlib.metadata.entry_points(group=group):
            if ep.name in self._factories:
                log.warning(
                    "plugins.name_taken",
                    group=group,
                    plugin=ep.name,
                    value=ep.value,
                    taken_by=self._origin[ep.name],
                )
                continue
            try:
                factory = ep.load()
            except Exception as exc:
                self._broken[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "plugins.load_failed",
                    group=group,
                    plugin=ep.name,
                    value=ep.value,
                    error=self._broken[ep.name],
                )
                continue
            problem = factory_problem(factory)
            if problem is not None:
                self._broken[ep.name] = f"{ep.value}: {problem}"
                log.warning("plugins.unusable", group=group, plugin=ep.name, error=problem)
                continue
            self.register(ep.name, factory, origin=f"entry point {ep.value}")
            added.append(ep.name)
            log.info("plugins.loaded", group=group, plugin=ep.name, value=ep.value)
        return added


def factory_problem(factory: object) -> str | None:
    """Why `factory` cannot be a plugin factory, or None when it can."""
    if not callable(factory):
        return "not callable"
    params = getattr(factory, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return "has no `Params` pydantic model"
    if params.model_config.get("extra") != "forbid":
        # A misspelt parameter would otherwise be dropped without a word.
        return "its `Params` model must set extra='forbid'"
    return None


def validate_params(factory: object, raw: Mapping[str, Any]) -> BaseModel:
    """The plugin's own model over the raw config keys; raises pydantic's ValidationError."""
    params: type[BaseModel] = getattr(factory, "Params")  # noqa: B009 - checked by factory_problem
    return params.model_validate(dict(raw))

"""Policies: the YAML language, its loader, and the engine that evaluates them.

The runtime uses::

    policies = load_policies(cfg.policies_dir, known_markers=cfg.marker_paths(), ...)
    actions = ActionRegistry.with_builtins(); actions.register(evacuate); ...
    engine = PolicyEngine(policies, actions, signals, peers, clock,
                          global_dry_run=cfg.dry_run,
                          limits=EngineLimits.from_config(cfg.limits), host=cfg.name)
    transitions = await engine.tick()   # every second, and when a marker changes
    engine.states()                     # for `ferry status` and metrics
    await engine.aclose()               # at shutdown
"""

from agent.policy.actions import ActionRegistry, LogAction
from agent.policy.engine import EngineLimits, PolicyEngine
from agent.policy.known_signals import known_signal_patterns
from agent.policy.loader import load_policies
from agent.policy.models import Policy
from agent.policy.state import PolicyStatus, Transition

__all__ = [
    "ActionRegistry",
    "EngineLimits",
    "LogAction",
    "Policy",
    "PolicyEngine",
    "PolicyStatus",
    "Transition",
    "known_signal_patterns",
    "load_policies",
]

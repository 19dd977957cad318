"""Capped exponential backoff with jitter, for every retry loop in the agent.

Jitter keeps a fleet of agents that lost the same peer (or dockerd) from
retrying in lockstep. "Equal jitter": each delay is drawn from [d/2, d], so a
retry never comes sooner than half the nominal delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.5  # the fraction of each delay that is random
    rand: Callable[[], float] = field(default=random.random, repr=False)
    _next: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError("backoff needs 0 < initial <= cap")
        self._next = self.initial

    def delay_for(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1 = the first retry)."""
        nominal = min(self.initial * self.factor ** max(attempt - 1, 0), self.cap)
        return self._jittered(nominal)

    def next(self) -> float:
        """The next delay of a running loop; grows until reset()."""
        nominal = self._next
        self._next = min(self._next * self.factor, self.cap)
        return self._jittered(nominal)

    def reset(self) -> None:
        self._next = self.initial

    def _jittered(self, nominal: float) -> float:
        return nominal * (1 - self.jitter * self.rand())

from __future__ import annotations

import pytest

from agent.backoff import Backoff


def test_grows_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 8.0, jitter=0)
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    b.reset()
    assert b.next() == 1.0
    assert [b.delay_for(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 8.0]


def test_jitter_stays_between_half_and_the_whole_delay() -> None:
    low = Backoff(1.0, 8.0, rand=lambda: 1.0)
    high = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert [low.next() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert [high.next() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]


def test_refuses_a_cap_below_the_start() -> None:
    with pytest.raises(ValueError):
        Backoff(5.0, 1.0)

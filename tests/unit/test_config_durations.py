from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from agent.durations import Duration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h0m5s", 3605.0),
        ("1.5", 1.5),
        ("10", 10.0),
        (3, 3.0),
        (0.25, 0.25),
        (" 30S ", 30.0),
    ],
)
def test_parses(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "m", "30s1m", "1m1m", "-1", "-5s", "1 m", "nan", True])
def test_rejects_with_a_hint(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [0.0, 0.5, 5.0, 90.0, 3605.0, 93600.0])
def test_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_pydantic_type() -> None:
    class M(BaseModel):
        d: Duration

    assert M(d="1m").d == 60.0  # type: ignore[arg-type]
    assert M(d=2).d == 2.0
    assert M(d="1m").model_dump(mode="json") == {"d": "1m"}  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="invalid duration '5x'"):
        M(d="5x")  # type: ignore[arg-type]

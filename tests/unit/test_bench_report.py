"""The bench's arithmetic: medians of repeated cells and the target lines."""

from __future__ import annotations

from tests.bench import Result, _median, _report


def _r(downtime: float) -> Result:
    return Result(downtime=downtime, total=downtime + 1, bytes=1000)


def test_a_repeated_cell_is_its_median_move_and_keeps_every_downtime() -> None:
    cell = _median([_r(d) for d in (0.9, 0.7, 1.6, 0.8, 0.75)])
    assert cell.downtime == 0.8 and cell.total == 1.8
    assert cell.downtimes == (0.9, 0.7, 1.6, 0.8, 0.75)


def test_the_counter_target_compares_medians_and_the_report_shows_each_move() -> None:
    rows = {
        "counter": {
            "manual": _median([_r(d) for d in (1.0, 1.6, 0.9)]),
            "lazy": _median([_r(d) for d in (0.5, 0.45, 0.8)]),
        }
    }
    text = "\n".join(_report(rows, None, {"host1": 0.2}))
    assert "met  counter downtime / manual 0.50x (<= 0.5x)" in text
    assert "counter        lazy downtime of each move (median above): 0.50, 0.45, 0.80 s" in text

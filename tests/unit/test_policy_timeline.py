from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InputError
from agent.policy.models import Policy
from agent.policy.timeline import Timeline, load_timeline, run_timeline
from tests.helpers import run_async

OOM = Policy.model_validate(
    {
        "name": "oom",
        "when": {"event": "oom", "count_gte": 3, "within": "1m"},
        "action": "move",
        "cooldown": "30s",
    }
)


def timeline(**kw: object) -> Timeline:
    spec: dict[str, object] = {
        "containers": [{"name": "db", "labels": {"ferry.migrate": "true"}, "memory": "1GiB"}],
        "peers": [{"name": "b"}, {"name": "c", "draining": True}],
        "steps": [
            {"at": "5s", "events": [{"action": "oom", "container": "db", "count": 2}]},
            {"at": "10s", "events": [{"action": "oom", "container": "db"}]},
        ],
        "until": "2m",
    }
    spec.update(kw)
    return Timeline.model_validate(spec)


def test_events_fire_a_policy_and_the_would_be_action_is_recorded() -> None:
    result = run_async(run_timeline(timeline(), [OOM]))
    events = [(t.at, t.event, t.skip_reason) for t in result.transitions]
    assert (10.0, "firing", None) in events
    dry = [t for t in result.transitions if t.skip_reason == "dry_run"]
    # Again after the 30s cooldown while the OOMs are still within the window.
    assert [(t.at, t.containers, t.targets) for t in dry] == [
        (10.0, ("db",), ("b",)),
        (40.0, ("db",), ("b",)),
    ]
    # The two OOMs at 5s count until 1m5s inclusive; at 1m6s only one is left.
    assert [t.at for t in result.transitions if t.event == "cleared"] == [66.0]
    assert result.states[20.0]["oom"] == "cooling_down"
    assert result.failures == []


def test_expectations_pass_and_fail_with_reasons() -> None:
    tl = timeline(
        expect=[
            {"policy": "oom", "event": "firing", "at": "10s"},
            {"policy": "oom", "event": "skipped", "reason": "dry_run", "targets": ["b"]},
            {"policy": "oom", "state": "ok", "at": "1m30s"},
            {"policy": "oom", "event": "firing", "at": "11s"},
            {"policy": "oom", "event": "firing", "count": 0},
            {"policy": "oom", "state": "firing", "at": "1m30s"},
            {"policy": "nope", "state": "ok", "at": "1s"},
        ]
    )
    result = run_async(run_timeline(tl, [OOM]))
    assert len(result.failures) == 4
    assert result.failures[0].startswith(
        "expect[3] (policy oom, event firing, at 11s): did not happen"
    )
    assert "(saw firing at:" in result.failures[0]
    assert (
        result.failures[1].startswith("expect[4]")
        and "happened 1 time(s) (at 10s)" in result.failures[1]
    )
    assert result.failures[2].endswith("state was ok")
    assert "no policy named 'nope'" in result.failures[3]


def test_signals_persist_and_null_removes_them() -> None:
    p = Policy.model_validate(
        {
            "name": "load",
            "when": {"not": {"signal": "load.1", "op": ">", "value": 100}},
            "action": "log",
        }
    )
    tl = timeline(
        steps=[{"at": 0, "signals": {"load.1": 1}}, {"at": 3, "signals": {"load.1": None}}],
        until=5,
    )
    result = run_async(run_timeline(tl, [p]))
    # Fires at 0; from 3s the signal is unknown, which never clears a firing policy.
    assert [result.states[float(t)]["load"] for t in range(6)] == ["cooling_down"] * 6
    assert [t.event for t in result.transitions if t.event in ("firing", "cleared")] == ["firing"]
    # `log` needs no target, so no target_chosen.
    assert not [t for t in result.transitions if t.event == "target_chosen"]


def test_step_resolution_and_replacing_inventory() -> None:
    tl = timeline(
        step="500ms",
        until="3s",
        steps=[
            {"at": 0, "events": [{"action": "oom", "container": "db", "count": 3}]},
            {"at": "1500ms", "containers": []},
        ],
    )
    result = run_async(run_timeline(tl, [OOM.model_copy(update={"cooldown": 0.0})]))
    assert sorted(result.states) == [i * 0.5 for i in range(7)]
    skipped = [(t.at, t.skip_reason) for t in result.transitions if t.event == "skipped"]
    assert skipped == [(0.0, "dry_run"), (0.5, "dry_run"), (1.0, "dry_run"), (1.5, "no_containers")]


def test_load_timeline_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("steps:\n  - at: soon\n    signals: {x: high}\nexpect:\n  - {policy: p}\n")
    with pytest.raises(InputError) as info:
        load_timeline(path)
    lines = info.value.lines()
    assert any(line.startswith(f"{path}: steps[0].at: invalid duration") for line in lines)
    assert any(line.startswith(f"{path}: steps[0].signals.x: ") for line in lines)
    assert any(
        line.startswith(f"{path}: expect[0]: give exactly one of `event` or `state`")
        for line in lines
    )


def test_json_timelines_load(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"steps": [{"at": "1s", "signals": {"load.1": 3}}]}')
    assert load_timeline(path).steps[0].at == 1.0

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InputError
from agent.model import DockerEvent
from agent.policy import load_policies
from agent.policy.conditions import EvalContext
from agent.policy.known_signals import is_known_signal, known_signal_patterns
from agent.policy.models import Policy
from agent.policy.sim import MemorySignals

CPU = """
policies:
  - name: cpu
    when: {signal: psi.cpu.some.avg10, op: ">", value: 50}
    for: 2m
    action: move
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, **kw: object) -> list[str]:
    with pytest.raises(InputError) as info:
        load_policies(path, **kw)  # type: ignore[arg-type]
    return info.value.lines()


def test_loads_a_directory_of_files_but_not_subdirectories(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", CPU)
    write(tmp_path, "b.yml", CPU.replace("name: cpu", "name: cpu2"))
    write(tmp_path, "notes.txt", "not a policy")
    (tmp_path / "tests").mkdir()
    write(tmp_path / "tests", "t.yaml", "steps: []")
    policies = load_policies(tmp_path)
    assert [p.name for p in policies] == ["cpu", "cpu2"]
    assert policies[0].for_ == 120.0
    assert policies[0].amount == 1
    assert policies[0].cooldown == 300.0
    assert policies[0].select.require_opt_in is True


def test_unknown_signal_names_file_policy_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "cpu.yaml", CPU.replace("psi.cpu.some.avg10", "psi.cpu.some.avg01"))
    (line,) = problems(path)
    assert line.startswith(
        f"{path}: policies[cpu].when.signal: unknown signal 'psi.cpu.some.avg01'"
    )
    assert "did you mean" in line


def test_malformed_duration_names_file_policy_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "cpu.yaml", CPU.replace("for: 2m", "for: 2 minutes"))
    (line,) = problems(path)
    assert line.startswith(f"{path}: policies[cpu].for: invalid duration '2 minutes'")


def test_nested_errors_and_unnamed_policies(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """
policies:
  - name: nested
    when:
      all:
        - {signal: load.1, op: ">", value: 3}
        - not: {event: oom, within: soon}
        - {signal: load.1, op: "~", value: 3}
        - {signal: load.1, marker: drain}
    action: move
    bogus: 1
  - when: {marker: drain}
    action: evacuate
""",
    )
    lines = problems(path)
    assert f"{path}: policies[nested].bogus: unknown key" in lines
    assert any(
        ln.startswith(f"{path}: policies[nested].when.all[1].not.within: invalid duration")
        for ln in lines
    )
    assert any(
        ln.startswith(f"{path}: policies[nested].when.all[2].op: input should be") for ln in lines
    )
    assert any(
        ln.startswith(f"{path}: policies[nested].when.all[3]: a condition needs exactly one of")
        for ln in lines
    )
    assert f"{path}: policies[1].name: field required" in lines


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", CPU)
    write(tmp_path, "b.yaml", CPU)
    (line,) = problems(tmp_path)
    assert line == f"{tmp_path / 'b.yaml'}: policies[cpu].name: duplicate policy name (also in {a})"


def test_every_bad_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "policies: [\n")
    write(tmp_path, "b.yaml", "just: text\n")
    write(tmp_path, "c.yaml", CPU.replace("for: 2m", "for: x"))
    lines = problems(tmp_path)
    assert len(lines) == 3
    assert lines[0].startswith(f"{tmp_path / 'a.yaml'}:2: YAML syntax error")
    assert lines[1] == f"{tmp_path / 'b.yaml'}: expected a mapping with a `policies:` list"


def test_context_checks_markers_peers_actions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
policies:
  - name: p
    when: {marker: upgrade}
    action: teleport
    targets: [node-b, node-x]
""",
    )
    lines = problems(
        path, known_markers={"drain"}, known_peers={"node-b"}, known_actions={"move", "log"}
    )
    assert any(
        ln.startswith(f"{path}: policies[p].when.marker: unknown marker 'upgrade'") for ln in lines
    )
    assert any(
        ln.startswith(f"{path}: policies[p].action: unknown action 'teleport'") for ln in lines
    )
    assert any(
        ln.startswith(f"{path}: policies[p].targets.peers: unknown peer(s) node-x") for ln in lines
    )
    # Without the context the same file is fine.
    assert load_policies(path)[0].targets.peers == ["node-b", "node-x"]


def test_extra_signal_patterns_can_be_passed(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", CPU.replace("psi.cpu.some.avg10", "gpu.util"))
    assert problems(path)
    assert load_policies(path, known_signals=[*known_signal_patterns(), "gpu.*"])


def test_defaults_and_shorthands() -> None:
    evac = Policy.model_validate({"name": "e", "when": {"marker": "drain"}, "action": "evacuate"})
    assert evac.amount == "all" and evac.count is None
    move = Policy.model_validate(
        {"name": "m", "when": {"marker": "drain"}, "action": "move", "targets": "any"}
    )
    assert move.amount == 1 and move.targets.peers == "any"
    assert move.targets.placement == "least_loaded"
    listed = Policy.model_validate(
        {"name": "m", "when": {"marker": "drain"}, "action": "move", "targets": ["b"]}
    )
    assert listed.targets.peers == ["b"]
    assert "marker drain present" in evac.summary()


@pytest.mark.parametrize(
    "name",
    [
        "load.1",
        "load.per_core.5",
        "psi.io.full.avg300",
        "mem.available_ratio",
        "disk.docker.free_bytes",
        "marker.drain",
        "command.raid",
        "containers.running",
        "docker.connected",
    ],
)
def test_known_signals(name: str) -> None:
    assert is_known_signal(name)


@pytest.mark.parametrize("name", ["load.2", "psi.gpu.some.avg10", "psi.cpu.some.avg5", "mem"])
def test_unknown_signals(name: str) -> None:
    assert not is_known_signal(name)


def cond(spec: object) -> Policy:
    return Policy.model_validate({"name": "c", "when": spec, "action": "log"})


def test_conditions_are_three_valued() -> None:
    signals = MemorySignals()
    ctx = EvalContext(signals, now=1000.0)
    high = cond({"signal": "load.1", "op": ">", "value": 2}).when
    assert high.evaluate(ctx) is None  # never seen: unknown, not false
    assert cond({"not": {"signal": "load.1", "op": ">", "value": 2}}).when.evaluate(ctx) is None
    both = cond({"all": [{"signal": "load.1", "op": ">", "value": 2}, {"marker": "drain"}]}).when
    either = cond({"any": [{"signal": "load.1", "op": ">", "value": 2}, {"marker": "drain"}]}).when
    signals.set("marker.drain", 0.0)
    assert both.evaluate(ctx) is False  # one false decides `all`
    assert either.evaluate(ctx) is None
    signals.set("marker.drain", 1.0)
    assert both.evaluate(ctx) is None
    assert either.evaluate(ctx) is True  # one true decides `any`
    signals.set("load.1", 3.0)
    assert both.evaluate(ctx) is True
    absent = cond({"marker": "drain", "present": False}).when
    assert absent.evaluate(ctx) is False


def test_event_condition_counts_within_the_window() -> None:
    signals = MemorySignals()
    oom = cond({"event": "oom", "count_gte": 2, "within": "10m"}).when
    for ts in (100.0, 500.0, 650.0):
        signals.add_event(DockerEvent("oom", "id", "db", ts))
    signals.add_event(DockerEvent("die", "id", "db", 690.0))
    assert oom.evaluate(EvalContext(signals, now=700.0)) is True  # 500 and 650
    assert oom.evaluate(EvalContext(signals, now=1120.0)) is False  # only 650 is in [520, 1120]

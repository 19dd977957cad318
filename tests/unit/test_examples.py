"""Every shipped example must load, validate and (for timelines) pass its own expectations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from agent.config import FerryConfig, PluginSpec, load_config
from agent.policy import load_policies
from agent.policy.loader import policy_files
from agent.policy.timeline import load_timeline, run_timeline
from tests.helpers import run_async

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
TIMELINES = sorted((POLICIES / "tests").glob("*.timeline.yaml"))


@pytest.mark.parametrize("path", policy_files(POLICIES), ids=lambda p: p.name)
def test_each_policy_file_is_valid(path: Path) -> None:
    policies = load_policies(path)
    assert policies
    assert all(p.description for p in policies), "examples should say what they are for"


def test_example_config_is_valid_and_its_policies_match_it() -> None:
    cfg = load_config(ROOT / "config.example.yaml", environ={})
    assert cfg.policies_dir == POLICIES
    load_policies(
        cfg.policies_dir,
        known_markers=set(cfg.marker_paths()),
        known_peers={p.name for p in cfg.peers},
        known_actions={"evacuate", "move", "log"},
    )


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    if model is PluginSpec:
        return out  # a plugin's keys are its own; the example lists none installed
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        out.add(key)
        ann: Any = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out |= _keys(candidate, f"{key}.")
    return out


def _present(data: Any, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(data, dict):
        for k, v in data.items():
            out.add(f"{prefix}{k}")
            if not (prefix.endswith("extra.") or f"{prefix}{k}".endswith("extra")):
                out |= _present(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for item in data:
            out |= _present(item, prefix)
    return out


def test_example_config_shows_every_key() -> None:
    data = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    # fleet: is optional and shown commented out (installed configs must not dial etcd).
    wanted = {k for k in _keys(FerryConfig) if not k.startswith("fleet.")} - {"fleet"}
    missing = wanted - _present(data)
    assert not missing, f"config.example.yaml lacks: {sorted(missing)}"


def _fleet_block() -> str:
    lines = (ROOT / "config.example.yaml").read_text().splitlines()
    start = lines.index("# fleet:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    return "\n".join(block) + "\n"


def test_example_fleet_block_is_valid_and_shows_every_fleet_key(tmp_path: Path) -> None:
    text = _fleet_block()
    data = yaml.safe_load(text)
    wanted = {k for k in _keys(FerryConfig) if k.startswith("fleet.")}
    missing = wanted - _present(data)
    assert not missing, f"config.example.yaml's fleet block lacks: {sorted(missing)}"
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    assert cfg.fleet is not None and cfg.fleet.max_draining_hosts == 1


@pytest.mark.parametrize("path", TIMELINES, ids=lambda p: p.name)
def test_example_timelines_meet_their_expectations(path: Path) -> None:
    timeline = load_timeline(path)
    assert timeline.expect
    result = run_async(run_timeline(timeline, load_policies(POLICIES)))
    assert result.failures == []


def test_there_is_an_example_timeline() -> None:
    assert TIMELINES

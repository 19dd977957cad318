"""Fuzz the config and policy parsers through the real CLI commands.

Whatever the input (YAML-ish noise, bytes, mutations of config.example.yaml and
of every file in policies/, random nested structures, environment overrides),
`ferry check-config` / `check-policies` / `test-policy` exit 0 with "ok", or 2
with only well-formed "FILE: KEY: REASON" lines on stderr: never a traceback,
never another exit code. Examples and per-example time are bounded so the
whole module stays well under a minute on a busy 2-core machine.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.cli import EXIT_BAD_INPUT, EXIT_OK, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "config.example.yaml").read_text()
POLICY_FILES = sorted((ROOT / "policies").glob("*.yaml"))
POLICY_TEXTS = [p.read_text() for p in POLICY_FILES]

FUZZ = settings(
    max_examples=80,
    # ms per example: a hang fails, a busy shared CI machine does not (examples take ~20ms).
    deadline=10_000,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(ROOT / "policies", root / "policies", ignore=shutil.ignore_patterns("tests"))
    (root / "mutated").mkdir()
    yield root


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("FERRY__"):
            monkeypatch.delenv(var)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_clean_outcome(result: Result, *files: str) -> None:
    """Exit 0 with "ok", or exit 2 with only one-line problems that name a file (and hints)."""
    out = result.output
    assert "Traceback" not in out, out
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"crashed: {result.exception!r}") from result.exception
    assert result.exit_code in (EXIT_OK, EXIT_BAD_INPUT), (result.exit_code, out)
    if result.exit_code == EXIT_OK:
        assert result.stdout.startswith("ok"), out
        assert result.stderr == "", result.stderr
        return
    lines = result.stderr.splitlines()
    assert lines, "exit 2 without a message"
    for line in lines:
        if line.startswith("note: "):
            continue  # a hint after the problems (e.g. where plugin signals come from)
        assert line.startswith((*files, "$FERRY__")), f"message names no input file: {line!r}"
        assert len(line) < 1200, f"not a clear message: {line[:200]!r}..."
        assert line.rstrip() == line and ": " in line, line


# -------------------------------------------------------------------- strategies

NASTY_SCALARS = [
    ".nan", ".inf", "-.inf", "-1", "0", "1e400", "1.0e400", "9" * 60, "~=", "~nobody-x/y",
    "/", "/etc", "/proc/self", " /x", "x ", '""', "''", "null", "~", "true", "no", "[]", "{}",
    "100000000000h", "-5s", "1ms", "0s", "16EiB", "-1GiB", "!!binary aGVsbG8=",
    "!!python/object:os.system", "&a x", "*a", "? [a]", "'\\x00'", '"\\u2028"', "2001-12-14",
    "0x1F", "0o17", "1_000", "+inf", "NaN", "[[[[[[[[", "{a: {b: {c:", "|", ">", "%YAML 1.1",
]  # fmt: skip

YAML_ALPHABET = st.sampled_from(
    [*"abcxyz019 _-.:/~!&*?|>'\"[]{},#%@`\\\n\t", "\n  ", "- ", ": ", "\x00", "\u2028"]
)
yaml_ish = st.lists(YAML_ALPHABET, max_size=200).map("".join)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(NASTY_SCALARS)
)
nested = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True, default_flow_style=None)


@st.composite
def text_mutations(draw: st.DrawFn, source: str) -> str:
    """Line-level edits: drop, duplicate, swap in nasty scalars, splice in noise."""
    lines = source.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["drop", "dup", "value", "noise", "indent"]))
        if how == "drop":
            del lines[i]
        elif how == "dup":
            lines.insert(i, lines[i])
        elif how == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.sampled_from(NASTY_SCALARS))}"
        elif how == "noise":
            lines.insert(i, draw(yaml_ish))
        else:
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip()
        if not lines:
            break
    return "\n".join(lines) + "\n"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def tree_mutations(draw: st.DrawFn, source: str) -> str:
    """Replace one node of the parsed document with a random structure, then dump it."""
    doc = yaml.safe_load(source)
    path = draw(st.sampled_from(_paths(doc)[1:]))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = draw(nested)
    return _dump(doc)


# -------------------------------------------------------------------- check-config


def _check_config(workdir: Path, text: str | bytes) -> None:
    path = workdir / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = run("check-config", str(path))
    assert_clean_outcome(result, str(path), str(workdir / "policies"))


@FUZZ
@given(text=yaml_ish)
def test_config_yaml_ish_text(workdir: Path, text: str) -> None:
    _check_config(workdir, text)


@FUZZ
@given(data=st.binary(max_size=300))
def test_config_bytes(workdir: Path, data: bytes) -> None:
    _check_config(workdir, data)


@FUZZ
@given(text=text_mutations(EXAMPLE) | tree_mutations(EXAMPLE))
def test_config_example_mutations(workdir: Path, text: str) -> None:
    _check_config(workdir, text)


@FUZZ
@given(value=nested)
def test_config_random_structures(workdir: Path, value: Any) -> None:
    _check_config(workdir, _dump(value))


@FUZZ
@given(
    env=st.dictionaries(
        st.sampled_from(
            [
                "FERRY__NAME", "FERRY__STATE_DIR", "FERRY__CONTROL_SOCKET", "FERRY__PEERS__0__NAME",
                "FERRY__PEERS__0__ADDRESS", "FERRY__PEERS__5__WEIGHT", "FERRY__LIMITS__WINDOW",
                "FERRY__MIGRATION__RESTORE_TIMEOUT", "FERRY__LIMITS", "FERRY__", "FERRY____X",
                "FERRY__SIGNALS__COMMANDS__0__COMMAND", "FERRY__MARKERS__EXTRA__A_B",
            ]
        ),
        st.sampled_from(NASTY_SCALARS) | yaml_ish,
        max_size=3,
    )
)  # fmt: skip
def test_config_env_overrides(workdir: Path, env: dict[str, str]) -> None:
    path = workdir / "config.yaml"
    path.write_text(EXAMPLE)
    env = {k: v.replace("\x00", "") for k, v in env.items()}  # exec env cannot hold NUL
    assert_clean_outcome(run("check-config", str(path), env=env), str(path))


# -------------------------------------------------------------------- policies


def _check_policy(workdir: Path, text: str) -> None:
    path = workdir / "mutated" / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_clean_outcome(run("check-policies", str(path.parent)), str(path))


@FUZZ
@given(text=st.sampled_from(POLICY_TEXTS).flatmap(lambda t: text_mutations(t) | tree_mutations(t)))
# Found by a longer run: a repr cut at 40 characters left a trailing space.
@example(text=f"policies:\n- {{name: a, action: move, amount: {{{'k' * 32}: 1, b: 2}}}}\n")
def test_policy_mutations(workdir: Path, text: str) -> None:
    _check_policy(workdir, text)


@FUZZ
@given(value=nested)
def test_policy_random_structures(workdir: Path, value: Any) -> None:
    _check_policy(workdir, _dump({"policies": [value]}))


@FUZZ
@given(
    when=nested,
    signal=st.sampled_from(
        ["mem.available_ratio", "psi.cpu.some.avg10", "load.1", "marker.drain", "x.y"]
    ),
    op=st.sampled_from([">", "<", "==", "!=", "=>", ""]),
    value=st.floats() | st.integers(-(10**20), 10**20) | st.sampled_from(NASTY_SCALARS),
)
def test_policy_conditions(workdir: Path, when: Any, signal: str, op: str, value: Any) -> None:
    leaf = {"signal": signal, "op": op, "value": value}
    cond = {"all": [leaf, {"not": when}]} if isinstance(value, int) else leaf
    policy = {"name": "p", "when": cond, "action": "move"}
    _check_policy(workdir, _dump({"policies": [policy]}))


def test_nasty_floats_dump_as_yaml() -> None:
    # The strategies rely on safe_dump writing .nan/.inf so the parser sees them.
    assert yaml.safe_load(_dump({"a": math.nan, "b": -math.inf})) is not None

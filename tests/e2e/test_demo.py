"""`make demo` runs in CI too, so it cannot silently rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.testbed, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def test_demo_shows_the_counter_carrying_on(testbed_hosts, clean_containers):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.demo"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"counter continued: (\d+) on host1 -> (\d+) on host[23]", out)
    assert m, f"no continued counter in the demo output:\n{out[-4000:]}"
    assert int(m.group(2)) >= int(m.group(1)) >= 15
    assert "same process nonce True" in out
    assert "host1 still has demo-counter: False" in out
    assert "migration.phase" in out or "policy.acting" in out, (
        "the agent's decisions were not shown"
    )

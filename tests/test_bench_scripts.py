"""The benchmark scripts that start servers through run.start() take every setting it reads: one
that lost a flag fails only when someone runs it on a quiet machine, long after the change."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "tools" / "bench"
STARTERS = sorted(p.name for p in BENCH.glob("*.py") if "server_arguments(" in p.read_text() and p.name != "run.py")


def test_the_starters_are_found():
    assert {"prefix.py", "key_isolation.py", "tool_calls.py"} <= set(STARTERS)


@pytest.mark.parametrize("script", ["run.py", *STARTERS])
def test_a_bench_script_takes_the_server_settings(script):
    usage = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 0, usage.stderr
    for flag in ("--ctx", "--threads", "--slots", "--port", "--out"):
        assert flag in usage.stdout, f"{script} has no {flag}"

"""The Makefile's prerequisite check names what is missing and the apt-get line that installs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import ROOT


def test_missing_prerequisites_print_the_apt_get_line(tmp_path):
    # A PATH with make and a shell but no cmake or compiler, and a python3 without venv.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "sh", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python3").chmod(0o755)
    result = subprocess.run(["make", "-s", "prerequisites"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": str(bin_dir)})
    assert result.returncode != 0
    assert "sudo apt-get install -y python3-venv cmake build-essential" in result.stdout


def test_prerequisites_pass_on_this_machine():
    result = subprocess.run(["make", "-s", "prerequisites", f"PYTHON={sys.executable}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_test_collects_the_wheelhouse_the_update_tests_need():
    """Without it tests/test_update.py skips: make test must build it before pytest runs (it was
    once named before its variable was set, so the prerequisite was empty and CI skipped them)."""
    database = subprocess.run(["make", "-pn", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    rule = next(line for line in database.splitlines() if line.startswith("test:"))
    assert ".venv/wheelhouse" in rule.split()

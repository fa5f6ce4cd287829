"""tools/cross-build: the scripts parse, and the build refuses any sdist but the pinned one.
(The builds themselves take minutes: `make wheels-aarch64 smoke-aarch64` runs them.)"""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT

CROSS = ROOT / "tools" / "cross-build"


def test_scripts_parse():
    for script in ("build.sh", "smoke.sh", "jetson-build.sh", "vulkan-test.sh"):
        assert subprocess.run(["sh", "-n", str(CROSS / script)]).returncode == 0, script
    for script in ("make_wheel.py", "check.py", "smoke.py", "old_vulkan_headers.py"):
        compile((CROSS / script).read_text(), script, "exec")


def test_a_different_sdist_is_refused(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"not the real one")
    result = subprocess.run([str(CROSS / "build.sh"), "armv8.0", str(tmp_path / "dist")], capture_output=True,
                            text=True, env={**os.environ, "EDGELLM_CROSS_CACHE": str(cache)})
    assert result.returncode == 1
    assert "is not the pinned sdist (SHA-256 differs); refusing it" in result.stderr
    assert not (cache / "src-armv8.0").exists()


def test_unknown_variants_are_refused(tmp_path):
    result = subprocess.run([str(CROSS / "build.sh"), "armv9"], capture_output=True, text=True,
                            env={**os.environ, "EDGELLM_CROSS_CACHE": str(tmp_path)})
    assert result.returncode == 2 and "unknown variant armv9" in result.stderr

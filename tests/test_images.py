"""images/: the scripts parse, and the client test-boot.sh uses to judge a booted image gives
the right verdicts against a real server. (The image build and the boot test themselves are
`make image` and `make image-test`: tens of minutes, not part of `make test`.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT, Server
from tiny_models import CHATML, write_model

IMAGES = ROOT / "images"


@pytest.mark.parametrize("script", ["build.sh", "test-boot.sh", "configure-rootfs.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(IMAGES / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def check(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(IMAGES / "check_api.py"), url, *args], capture_output=True,
                          text=True, timeout=60)


def test_the_boot_test_client_passes_a_good_box_and_fails_a_bad_one(tmp_path):
    model = write_model(tmp_path / "tiny.gguf", script=SCRIPT, chat_template=CHATML)
    random = write_model(tmp_path / "random.gguf", seed=3, chat_template=CHATML)
    key = "sk-edgellm-" + "k" * 32
    server = Server(model, tmp_path, config=f'[server]\napi_keys = ["{key}"]\n')
    try:
        assert check(server.url, "health").returncode == 0
        assert check(server.url, "has-model", key, "tiny").returncode == 0
        good = check(server.url, "chat", key, "tiny")
        assert good.returncode == 0 and "Once upon a time" in good.stdout, good.stderr
        missing = check(server.url, "has-model", key, "gemma")
        assert missing.returncode == 1 and missing.stderr.startswith("check_api: gemma not among")
        wrong_key = check(server.url, "has-model", "sk-wrong", "tiny")
        assert wrong_key.returncode == 1 and "Traceback" not in wrong_key.stderr
    finally:
        server.stop()
    (tmp_path / "other").mkdir()
    other = Server(random, tmp_path / "other", config=f'[server]\napi_keys = ["{key}"]\n')
    try:
        wrong_answer = check(other.url, "chat", key, "random")
        assert wrong_answer.returncode == 1 and "unexpected answer" in wrong_answer.stderr
    finally:
        other.stop()
    assert check(server.url, "health").returncode == 1  # nobody listening any more

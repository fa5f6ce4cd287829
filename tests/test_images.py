"""images/: the scripts parse, every command they run is installed by `make image-tools` or
comes with every Debian 12, the boot test's VM starts its devices on this machine, and the
client test-boot.sh uses to judge a booted image gives the right verdicts against a real server.
(The image build and the boot test themselves are `make image` and `make image-test`: tens of
minutes, not part of `make test`.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import ROOT, SCRIPT, Server
from tiny_models import CHATML, write_model

from edgellm import __version__

IMAGES = ROOT / "images"


@pytest.mark.parametrize("script", ["build.sh", "test-boot.sh", "configure-rootfs.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(IMAGES / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


SCRIPTS = ("build.sh", "configure-rootfs.sh", "test-boot.sh")
# Command words that are this repository's own: the venv's python, the scripts beside these.
OWN = ("$python", "$repo/", "$here/")
# The scripts' functions that run their arguments as a command ("$@"), after this many others.
RUNS_ITS_ARGUMENTS = {"wait_for": 2}
# What Debian recommends beside a package in IMAGE_TOOLS and the image build and boot test do
# without (both passed on a machine without any of these). A new Recommends fails the test
# until it is installed by image-tools or named here with the reason.
UNNEEDED = {
    "fakechroot": "mmdebstrap's fakechroot mode; build.sh runs --mode=root",
    "fakeroot": "mmdebstrap's fakeroot mode; build.sh runs --mode=root",
    "uidmap": "mmdebstrap's unshare mode; build.sh runs --mode=root",
    "gpg": "mmdebstrap infers a signed-by for the sources with it; apt verifies with gpgv anyway",
    "libdistro-info-perl": "mmdebstrap maps suite names with it; build.sh names bookworm",
    "libdpkg-perl": "mmdebstrap guesses a keyring by vendor with it; the host's keyring is used",
    "binfmt-support": "build.sh registers qemu-aarch64 with binfmt_misc itself",
    "qemu-system-gui": "the boot test runs -display none",
    "qemu-utils": "qemu-img and friends: the card is a raw file made with truncate",
    "ipxe-qemu": "the NIC's option ROM for firmware network boot: the VM boots -kernel, romfile=",
    "qemu-efi-aarch64": "UEFI firmware: the VM boots -kernel",
    "qemu-efi-arm": "UEFI firmware: the VM boots -kernel",
    "qemu-block-extra": "network block backends: the drives are local files",
    "sensible-utils": "fdisk's interactive mode; sfdisk reads a script",
    "bzip2": "bmaptool for .bz2 images; the image is .xz",
    "lzop": "bmaptool for .lzo images; the image is .xz",
    "e2fsprogs-l10n": "translations",
    "dbus": "systemctl --root edits unit links on disk without a bus",
    "dbus-broker": "systemctl --root edits unit links on disk without a bus",
    "systemd-timesyncd": "the host's clock service; systemctl --root needs none",
    "chrony": "the host's clock service; systemctl --root needs none",
    "ntpsec": "the host's clock service; systemctl --root needs none",
    "openntpd": "the host's clock service; systemctl --root needs none",
}
needs_shfmt = pytest.mark.skipif(shutil.which("shfmt") is None, reason="needs shfmt (make test-tools)")
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg: a Debian machine")


def image_tools() -> dict[str, str]:
    """IMAGE_TOOLS as make expands it: command -> the Debian package that installs it."""
    shown = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show"], cwd=ROOT,
                           input="show:\n\t@echo $(IMAGE_TOOLS)\n", capture_output=True, text=True, check=True)
    return dict(pair.split(":", 1) for pair in shown.stdout.split())


def word_text(word: dict, quoted: bool = False) -> str:
    """A shell word as written, quotes removed and parameters kept as `$name`."""
    text = ""
    for part in word.get("Parts", []):
        kind = part["Type"]
        if kind == "Lit":
            value = part["Value"]
            text += re.sub(r'\\([$`"\\\n])', r"\1", value) if quoted else value
        elif kind == "SglQuoted":
            text += part["Value"]
        elif kind == "DblQuoted":
            text += word_text(part, quoted=True)
        elif kind == "ParamExp":
            text += "$" + part["Param"]["Value"]
        else:
            text += "$(...)"
    return text


def nodes(tree: object) -> Iterator[dict]:
    if isinstance(tree, dict):
        yield tree
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            yield from nodes(item)


def commands_run(script: str) -> set[str]:
    """The command words a shell script runs on this machine, by shfmt's parse of it: functions
    and builtins left out, `command -v` a query, `chroot ROOT ...` run inside the image, and the
    mmdebstrap hooks (shell run on the host) parsed in turn."""
    parsed = subprocess.run(["shfmt", "--to-json"], input=script, capture_output=True, text=True, check=True)
    tree = json.loads(parsed.stdout)
    functions = {node["Name"]["Value"] for node in nodes(tree) if node.get("Type") == "FuncDecl"}
    found = set()
    for node in nodes(tree):
        if node.get("Type") != "CallExpr" or not node.get("Args"):
            continue
        words = [word_text(arg) for arg in node["Args"]]
        if words[:2] == ["command", "-v"] or words[0] == "$@":
            continue  # a query; what a RUNS_ITS_ARGUMENTS function is given
        found.add(words[0])
        skip = RUNS_ITS_ARGUMENTS.get(words[0])
        if skip is not None and len(words) > skip + 1:
            found.add(words[skip + 1])
        if words[0] == "mmdebstrap":
            for word in words:
                hook = re.match(r"--[a-z-]+-hook=(.*)", word, re.S)
                if hook:
                    found |= commands_run(hook.group(1))
    builtins = subprocess.run(["bash", "-c", "compgen -b"], capture_output=True, text=True).stdout.split()
    return found - functions - set(builtins)


def owner(command: str) -> tuple[str, str] | None:
    """(package, priority) of the dpkg package that ships `command` on this machine, if any."""
    path = shutil.which(command, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    if path is None:
        return None
    real = os.path.realpath(path)
    names = {path, real} | {p.removeprefix("/usr") for p in (path, real)} | {"/usr" + p for p in (path, real)}
    listed = subprocess.run(["dpkg-query", "-S", *names], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        package, _, shipped = line.partition(": ")
        if shipped in names:
            package = package.split(",")[0].split(":")[0]
            fields = subprocess.run(["dpkg-query", "-W", "-f", "${Priority} ${Essential}", package],
                                    capture_output=True, text=True, check=True).stdout.split()
            return package, "required" if "yes" in fields[1:] else fields[0]
    return "", "not from a package"


@needs_shfmt
def test_the_command_parser_sees_what_a_script_runs():
    script = """f() { mkfs.vfat "$1"; }
wait_for() { until "$@"; do sleep 1; done; }
wait_for 5 "the disk" mcopy -s x ::/
[ -e x ] || mount -t tmpfs none /mnt && f x | xz > "$(mktemp)"
command -v arch-test >/dev/null || "$python" -m pip
chroot "$root" passwd -l root
mmdebstrap --customize-hook='chroot "$1" dpkg-divert --add x' --essential-hook="cp -r '$work' \\"\\$1/x\\"; chmod 755 y"
"""
    assert commands_run(script) == {"mkfs.vfat", "sleep", "mcopy", "mount", "xz", "mktemp", "$python", "chroot",
                                    "mmdebstrap", "cp", "chmod"}


@needs_shfmt
@needs_dpkg
def test_every_command_the_image_scripts_run_is_installed_by_image_tools_or_on_every_debian():
    tools = image_tools()
    problems = []
    for script in SCRIPTS:
        for command in sorted(commands_run((IMAGES / script).read_text())):
            if command.startswith(OWN) or command in tools:
                continue
            if "$" in command:
                problems.append(f"{script}: cannot tell what {command} runs")
                continue
            found = owner(command)
            if found is None:
                problems.append(f"{script}: {command} is not installed here and not in IMAGE_TOOLS")
            elif found[1] != "required":
                problems.append(f"{script}: {command} comes from {found[0] or 'no package'} ({found[1]}), "
                                "which a Debian 12 machine need not have: add it to IMAGE_TOOLS")
    assert not problems, "\n".join(problems)


@needs_dpkg
def test_image_tools_names_the_package_each_command_comes_from_and_what_they_recommend():
    tools = image_tools()
    problems = []
    for command, package in tools.items():
        found = owner(command)
        if found is not None and found[0] != package:
            problems.append(f"{command} comes from {found[0]}, not {package}")
    packages = sorted(set(tools.values()))
    listed = subprocess.run(["apt-cache", "depends", "--no-pre-depends", "--no-depends", "--no-suggests",
                             "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
                            capture_output=True, text=True)
    assert listed.returncode == 0, f"apt does not know one of {packages}: {listed.stderr}"
    recommends: dict[str, list[str]] = {}
    for line in listed.stdout.splitlines():
        if not line.startswith(" "):
            package = recommends.setdefault(line.strip(), [])
        elif found := re.fullmatch(r"\s*\|?Recommends: ([^<\s]\S*)", line):
            package.append(found.group(1))
    assert set(recommends) == set(packages), listed.stdout
    wanted = sorted({r for rs in recommends.values() for r in rs})
    shown = subprocess.run(["apt-cache", "show", "--no-all-versions", *wanted], capture_output=True, text=True).stdout
    required = set(re.findall(r"^Package: (\S+)\n(?:[^\n]+\n)*?Priority: required$", shown, re.M))
    for package, recommended in sorted(recommends.items()):
        for name in recommended:
            if name not in tools.values() and name not in required and name not in UNNEEDED:
                problems.append(f"{package} recommends {name}: install it in IMAGE_TOOLS or say in UNNEEDED "
                                "why the image build and boot test do without it")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="needs qemu-system-aarch64 (make test-tools)")
def test_the_boot_tests_vm_starts_its_devices_on_this_machine():
    result = subprocess.run([str(IMAGES / "test-boot.sh"), "--check-devices"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert "machine and devices start" in result.stdout


def check(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(IMAGES / "check_api.py"), url, *args], capture_output=True,
                          text=True, timeout=60)


def test_the_boot_test_client_passes_a_good_box_and_fails_a_bad_one(tmp_path):
    model = write_model(tmp_path / "tiny.gguf", script=SCRIPT, chat_template=CHATML)
    random = write_model(tmp_path / "random.gguf", seed=3, chat_template=CHATML)
    key = "sk-edgellm-" + "k" * 32
    (tmp_path / "opt").mkdir()  # the last update, as edgellm/update/layout.py records it
    (tmp_path / "opt" / "status.json").write_text('{"state": "updated", "from": "0.0.9", "to": "0.1.0", '
                                                  '"message": "updated from 0.0.9 to 0.1.0", "at": "2026-12-02"}')
    server = Server(model, tmp_path, config=f'[server]\napi_keys = ["{key}"]\n[update]\nroot = "{tmp_path / "opt"}"\n')
    try:
        assert check(server.url, "-", "health").returncode == 0
        assert check(server.url, "-", "has-model", key, "tiny").returncode == 0
        good = check(server.url, "-", "chat", key, "tiny")
        assert good.returncode == 0 and "Once upon a time" in good.stdout, good.stderr
        missing = check(server.url, "-", "has-model", key, "gemma")
        assert missing.returncode == 1 and missing.stderr.startswith("check_api: gemma not among")
        wrong_key = check(server.url, "-", "has-model", "sk-wrong", "tiny")
        assert wrong_key.returncode == 1 and "Traceback" not in wrong_key.stderr
        updated = check(server.url, "-", "update", key, __version__, "updated")
        assert updated.returncode == 0 and "updated from 0.0.9" in updated.stdout, updated.stderr
        rolled_back = check(server.url, "-", "update", key, __version__, "rolled-back")
        assert rolled_back.returncode == 1 and "expected" in rolled_back.stderr
    finally:
        server.stop()
    (tmp_path / "other").mkdir()
    other = Server(random, tmp_path / "other", config=f'[server]\napi_keys = ["{key}"]\n')
    try:
        wrong_answer = check(other.url, "-", "chat", key, "random")
        assert wrong_answer.returncode == 1 and "unexpected answer" in wrong_answer.stderr
    finally:
        other.stop()
    assert check(server.url, "-", "health").returncode == 1  # nobody listening any more

"""The units, as systemd/install.sh lays them out in an image's root filesystem: every one
passes `systemd-analyze verify`, the service rates 2.0 or better in `systemd-analyze security`,
and the installer makes the user, the state dir and the links. (images/test-boot.sh boots them.)"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

SYSTEMD = ROOT / "systemd"
UNITS = ["edgellm.service", "edgellm-firstboot.service", "edgellm-usb-import@sda1.service", "edgellm-update.service",
         "edgellm-update.path"]

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def system(tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """A root filesystem with the host's systemd units, then `install.sh ARGS ROOT`."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "opt/edgellm/bin").mkdir(parents=True)
    (root / "opt/edgellm/bin/edgellm").write_text("#!/bin/sh\n")  # the venv's entry point, for verify
    (root / "opt/edgellm/bin/edgellm").chmod(0o755)
    result = subprocess.run(["sh", str(SYSTEMD / "install.sh"), *args, str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return root, result


def verify(root: Path, unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", f"/usr/lib/systemd/system/{unit}"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", f"{unit}: {result.stderr}"


def exposure(root: Path, unit: str) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
                            capture_output=True, text=True)
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_verifies(tmp_path, unit):
    root, _ = system(tmp_path, "--image")
    verify(root, unit)


@pytest.mark.parametrize("unit", ["edgellm.service", "edgellm-usb-import@sda1.service"])
def test_the_units_rate_2_0_or_better(tmp_path, capsys, unit):
    """The USB import was 4.0 (root with CAP_SYS_ADMIN, any filesystem, no syscall filter)."""
    root, _ = system(tmp_path, "--image")
    score = exposure(root, unit)
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true: {unit} {score}")
    assert score <= 2.0


def test_the_service_is_bounded_and_gets_its_root_only_files_as_credentials(tmp_path):
    root, _ = system(tmp_path, "--image")
    unit = (root / "usr/lib/systemd/system/edgellm.service").read_text()
    assert "MemoryMax=90%" in unit and "LimitNOFILE=1024" in unit
    assert "LoadCredential=edgellm.toml:/etc/edgellm/edgellm.toml" in unit
    assert "ExecStart=/opt/edgellm/bin/edgellm serve\n" in unit  # the config from the credential
    config = (root / "etc/edgellm/edgellm.toml").stat()
    assert (config.st_uid, stat.S_IMODE(config.st_mode)) == (0, 0o600)
    trusted = (root / "etc/edgellm/trusted-keys").stat()
    assert (trusted.st_uid, stat.S_IMODE(trusted.st_mode)) == (0, 0o755)
    show = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/usr/lib/systemd/system/edgellm.service"],
                          capture_output=True, text=True)
    assert show.returncode == 0


@pytest.mark.parametrize("gpu", ["vulkan", "jetson"])
def test_gpu_drop_ins_verify_and_open_only_what_they_say(tmp_path, gpu, capsys):
    root, _ = system(tmp_path, "--gpu", gpu)
    drop_in = root / "etc/systemd/system/edgellm.service.d/gpu.conf"
    assert drop_in.read_text() == (SYSTEMD / "gpu" / f"{gpu}.conf").read_text()
    verify(root, "edgellm.service")
    score = exposure(root, "edgellm.service")
    with capsys.disabled():
        print(f"\nedgellm.service with the {gpu} drop-in: {score}")
    assert score <= 3.0  # devices, groups and W^X open; everything else as strict as without it


def test_image_install_makes_the_user_state_dir_and_links(tmp_path):
    root, _ = system(tmp_path, "--image")
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("edgellm:"))
    assert user[5] == "/var/lib/edgellm" and user[6] == "/usr/sbin/nologin"
    state = (root / "var/lib/edgellm").stat()
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (int(user[2]), 0o750)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.iterdir()} >= {"edgellm.service", "edgellm-firstboot.service"}
    assert (root / "etc/edgellm/edgellm.toml").read_text() == (SYSTEMD / "edgellm.toml").read_text()
    assert not (root / "etc/edgellm/api-keys").exists()  # each card makes its own at first boot
    rule = (root / "usr/lib/udev/rules.d/90-edgellm-usb-import.rules").read_text().splitlines()[-1]
    assert 'ENV{ID_BUS}=="usb"' in rule and 'ENV{SYSTEMD_WANTS}+="edgellm-usb-import@%k.service"' in rule
    script = root / "usr/libexec/edgellm/edgellm-usb-import"
    assert "mount -t vfat,exfat,ext4 -o ro,nosuid,nodev,noexec" in script.read_text() and "umount" in script.read_text()
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_vendor_os_install_makes_keys_once_and_skips_first_boot(tmp_path):
    root, first = system(tmp_path)
    keys = {name: (root / "etc/edgellm" / name).read_text() for name in ("api-keys", "admin-keys")}
    for name, text in keys.items():
        assert stat.S_IMODE((root / "etc/edgellm" / name).stat().st_mode) == 0o600
        key = text.splitlines()[-1]
        assert re.fullmatch(r"sk-edgellm-(admin-)?[A-Za-z0-9_-]{32}", key) and key in first.stdout
    assert (root / "var/lib/edgellm/firstboot-done").exists()  # the vendor's host name and partitions stay
    assert not (root / "etc/systemd/system/multi-user.target.wants/edgellm-firstboot.service").is_symlink()
    assert (root / "etc/systemd/system/multi-user.target.wants/edgellm.service").is_symlink()
    again = subprocess.run(["sh", str(SYSTEMD / "install.sh"), str(root)], capture_output=True, text=True)
    assert again.returncode == 0 and "sk-edgellm" not in again.stdout
    assert keys == {name: (root / "etc/edgellm" / name).read_text() for name in keys}


def test_unknown_gpu_is_refused(tmp_path):
    result = subprocess.run(["sh", str(SYSTEMD / "install.sh"), "--gpu", "mali", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown GPU drop-in 'mali'" in result.stderr
    assert not any(tmp_path.iterdir())

"""edgellm firstboot on a scratch system tree: identity, keys, pre-seeded files, once only.
The live parts (host name syscall, growing the mounted root) run in images/test-boot.sh;
growing a partition table is checked here on a disk image file with the real sfdisk."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_tls import openssl_fingerprint

import edgellm.firstboot as firstboot_module
from edgellm.config import load
from edgellm.firstboot import grow_partition


def firstboot(tree: dict[str, Path]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", "firstboot", "--root", str(tree["root"]),
                           "--boot", str(tree["boot"]), "--console", str(tree["console"])],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    root, boot = tmp_path / "root", tmp_path / "boot"
    (root / "etc/edgellm").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tedgellm\n")
    (root / "etc/hostname").write_text("edgellm\n")
    (root / "etc/edgellm/edgellm.toml").write_text('[server]\nhost = "0.0.0.0"\nstate_dir = "/var/lib/edgellm"\n')
    boot.mkdir()
    return {"root": root, "boot": boot, "console": tmp_path / "console"}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def keys(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_first_boot_makes_the_box_itself_and_tells_the_operator(tree):
    result = firstboot(tree)
    assert result.returncode == 0, result.stderr
    root, boot = tree["root"], tree["boot"]
    device = (root / "var/lib/edgellm/device-id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", device)
    hostname = f"edgellm-{device[:4]}"
    assert (root / "etc/hostname").read_text() == hostname + "\n"
    assert (root / "etc/hosts").read_text() == f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"

    api, admin = keys(root / "etc/edgellm/api-keys"), keys(root / "etc/edgellm/admin-keys")
    assert len(api) == 1 and re.fullmatch(r"sk-edgellm-[A-Za-z0-9_-]{32}", api[0])
    assert len(admin) == 1 and admin[0].startswith("sk-edgellm-admin-") and admin[0] != api[0]
    for name in ("api-keys", "admin-keys"):
        assert stat.S_IMODE((root / "etc/edgellm" / name).stat().st_mode) == 0o600

    note = (boot / "EDGELLM-API-KEY.txt").read_text()
    assert f"https://{hostname}.local:8080/v1" in note and api[0] in note and admin[0] in note
    assert note in tree["console"].read_text()
    # The journal gets what was done, never a key.
    assert api[0] not in result.stdout + result.stderr and admin[0] not in result.stdout + result.stderr
    assert "api-keys generated" in result.stdout and hostname in result.stdout
    assert f"https://{hostname}.local:8080/v1" in (root / "etc/issue.d/edgellm.issue").read_text()
    assert (root / "var/lib/edgellm/firstboot-done").exists()


def test_never_again_afterwards(tree):
    assert firstboot(tree).returncode == 0
    before = files(tree["root"]), files(tree["boot"])
    again = firstboot(tree)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (files(tree["root"]), files(tree["boot"])) == before
    unit = (Path(__file__).parent.parent / "systemd/edgellm-firstboot.service").read_text()
    assert "ConditionPathExists=!/var/lib/edgellm/firstboot-done" in unit


def test_cut_off_before_the_end_it_finishes_with_the_same_identity_and_keys(tree):
    """A power cut before the stamp: the next boot runs it again and keeps what was made."""
    assert firstboot(tree).returncode == 0
    made = {name: (tree["root"] / path).read_text() for name, path in
            [("id", "var/lib/edgellm/device-id"), ("api", "etc/edgellm/api-keys"), ("admin", "etc/edgellm/admin-keys")]}
    (tree["root"] / "var/lib/edgellm/firstboot-done").unlink()
    (tree["boot"] / "EDGELLM-API-KEY.txt").unlink()
    assert firstboot(tree).returncode == 0
    assert made == {name: (tree["root"] / path).read_text() for name, path in
                    [("id", "var/lib/edgellm/device-id"), ("api", "etc/edgellm/api-keys"),
                     ("admin", "etc/edgellm/admin-keys")]}
    assert keys(tree["root"] / "etc/edgellm/api-keys")[0] in (tree["boot"] / "EDGELLM-API-KEY.txt").read_text()
    assert not [p for p in tree["root"].rglob("*") if ".tmp" in p.name]


def test_pre_seeded_config_keys_and_trusted_keys_are_installed(tree, tmp_path):
    seed = tree["boot"] / "edgellm"
    (seed / "trusted-keys").mkdir(parents=True)
    (seed / "edgellm.toml").write_text('[server]\nhost = "0.0.0.0"\nport = 9090\n[discovery]\nname = "Shed"\n')
    (seed / "api-keys").write_text("# ours\nsk-site-phones-0123456789\nsk-site-laptops-0123456789\n")
    (seed / "admin-keys").write_text("sk-site-admin-0123456789\n")
    keygen = subprocess.run([sys.executable, "-m", "edgellm", "keygen", "-o", str(tmp_path / "site")],
                            capture_output=True, text=True)
    assert keygen.returncode == 0, keygen.stderr
    shutil.copy(tmp_path / "site.pub", seed / "trusted-keys/site.pub")

    result = firstboot(tree)
    assert result.returncode == 0, result.stderr
    root = tree["root"]
    # Its [bundles] trusted_keys is the root-owned directory (found by review: without the line the
    # service read keys from its own state dir, which it may write).
    installed = load(root / "etc/edgellm/edgellm.toml")
    assert installed.bundles.trusted_keys == "/etc/edgellm/trusted-keys"
    assert installed.server.port == 9090 and installed.discovery.name == "Shed"
    assert (root / "etc/edgellm/edgellm.toml").read_text().startswith((seed / "edgellm.toml").read_text())
    assert keys(root / "etc/edgellm/api-keys") == ["sk-site-laptops-0123456789", "sk-site-phones-0123456789"]
    assert keys(root / "etc/edgellm/admin-keys") == ["sk-site-admin-0123456789"]
    # Root's alone: the config may hold keys; the trusted keys decide what a stick may install.
    for name in ("edgellm.toml", "api-keys", "admin-keys"):
        found = (root / "etc/edgellm" / name).stat()
        assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (0, 0o600), name
    trusted = root / "etc/edgellm/trusted-keys"
    assert (trusted / "site.pub").read_bytes() == (tmp_path / "site.pub").read_bytes()
    assert trusted.stat().st_uid == 0 and (trusted / "site.pub").stat().st_uid == 0
    assert not (root / "var/lib/edgellm/trusted-keys").exists()
    note = (tree["boot"] / "EDGELLM-API-KEY.txt").read_text()
    assert "https://edgellm-" in note and ".local:9090/v1" in note and "sk-site-phones-0123456789" in note
    assert "Problems" not in note
    # The box's own TLS certificate, root's alone, its fingerprint (as openssl computes it) on the note.
    cert = root / "etc/edgellm/tls/device.pem"
    assert (cert.stat().st_uid, stat.S_IMODE(cert.stat().st_mode)) == (0, 0o600)
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    fingerprint = openssl_fingerprint(cert.read_bytes())
    assert f"  {fingerprint}\n" in note and f"--pinnedpubkey '{fingerprint}'" in note
    assert fingerprint in (root / "etc/issue.d/edgellm.issue").read_text()
    assert "DNS:edgellm-" in subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                                            input=cert.read_bytes(), capture_output=True).stdout.decode()
    # A bracketed [bundles] of the operator's keeps its own keys and gains the line.
    assert firstboot_module._with_trusted_keys('[bundles]\npolicy = "require-signature"\n') == \
        '[bundles]\ntrusted_keys = "/etc/edgellm/trusted-keys"  # added at first boot: root\'s directory\n' \
        'policy = "require-signature"\n'


def test_a_rerun_after_a_power_cut_keeps_the_certificate(tree):
    assert firstboot(tree).returncode == 0
    cert = tree["root"] / "etc/edgellm/tls/device.pem"
    first = cert.read_bytes()
    (tree["root"] / "var/lib/edgellm/firstboot-done").unlink()  # as if cut before the stamp
    assert firstboot(tree).returncode == 0
    assert cert.read_bytes() == first


def test_bad_pre_seeds_are_refused_plainly_and_the_box_still_comes_up(tree):
    seed = tree["boot"] / "edgellm"
    (seed / "trusted-keys").mkdir(parents=True)
    image_config = (tree["root"] / "etc/edgellm/edgellm.toml").read_text()
    (seed / "edgellm.toml").write_text("[server]\nport = 'eighty'\n")
    (seed / "api-keys").write_text("short\n")
    (seed / "trusted-keys/broken.pub").write_text("not a minisign key\n")

    result = firstboot(tree)
    assert result.returncode == 0, result.stderr
    root = tree["root"]
    assert (root / "etc/edgellm/edgellm.toml").read_text() == image_config
    assert keys(root / "etc/edgellm/api-keys")[0].startswith("sk-edgellm-")  # generated instead
    assert not (root / "etc/edgellm/trusted-keys/broken.pub").exists()
    note = (tree["boot"] / "EDGELLM-API-KEY.txt").read_text()
    problems = note.split("Problems at first boot:")[1]
    assert "edgellm.toml was not installed" in problems and "[server] port" in problems
    assert "edgellm/api-keys on the boot partition was not used" in problems
    assert "trusted key broken.pub was not installed" in problems
    assert "problem: " in result.stdout and "short" not in result.stdout


def test_a_missing_boot_partition_is_one_line_and_a_failure(tree):
    shutil.rmtree(tree["boot"])
    result = firstboot(tree)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a directory (is it mounted?)" in result.stderr


@pytest.mark.skipif(shutil.which("sfdisk") is None and not Path("/usr/sbin/sfdisk").exists(), reason="no sfdisk")
def test_the_root_partition_grows_to_the_end_of_a_bigger_card(tmp_path):
    """The image's partition table on a card twice its size: the last partition is extended,
    its start (and the boot partition) untouched."""
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    card = tmp_path / "card.img"
    card.write_bytes(b"")
    os.truncate(card, 64 * 2**20)
    layout = "label: dos\nstart=2048, size=16384, type=c\nstart=18432, size=32768, type=83\n"
    subprocess.run(["sfdisk", "-q", str(card)], input=layout, text=True, check=True)
    os.truncate(card, 128 * 2**20)  # flashed onto a bigger card

    grow_partition(card, 2)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(card)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]["partitions"]
    assert (table[0]["start"], table[0]["size"]) == (2048, 16384)
    assert table[1]["start"] == 18432 and table[1]["start"] + table[1]["size"] == 128 * 2**20 // 512

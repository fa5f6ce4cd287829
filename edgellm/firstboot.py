"""First boot of a freshly flashed card: make this box itself, once.

Run by edgellm-firstboot.service before the network comes up. Every step can be
run again (a power cut halfway means it runs again at the next boot and finishes);
the last step writes the stamp that keeps it from ever running after that:

1. a device id and a host name made from it (edgellm-XXXX, unique on the LAN);
2. edgellm.toml, API keys and trusted bundle keys the operator pre-seeded on the
   boot partition (in its edgellm/ folder) are checked and installed;
3. API keys that were neither pre-seeded nor made before are generated, and so is the
   box's TLS certificate (/etc/edgellm/tls, root's: the service gets it as a credential);
4. the host name, address, keys and the certificate's fingerprint go to the boot partition
   (EDGELLM-API-KEY.txt, readable on any laptop) and to the console; never to the journal;
5. the root partition, which holds the models, grows to fill the card.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgellm import tls
from edgellm.bundles.signing import SignatureError, read_public_key
from edgellm.config import ConfigError, ServerConfig, TLSFiles, from_dict, is_loopback, load, read_keys
from edgellm.discovery import device_id
from edgellm.errors import EdgeError
from edgellm.files import write_atomic

KEY_FILE = "EDGELLM-API-KEY.txt"  # on the boot partition
SEED_DIR = "edgellm"  # on the boot partition: edgellm.toml, api-keys, admin-keys, trusted-keys/*.pub
STAMP = "firstboot-done"  # in the state dir
TRUSTED_KEYS = "/etc/edgellm/trusted-keys"  # where the service reads the keys bundles are checked against


class FirstBootError(EdgeError):
    """Something the operator must fix (one line)."""

    code = "first_boot_failed"


@dataclass(frozen=True)
class Layout:
    """Where things are; `root` is "/" on the box, a scratch tree in tests."""

    root: Path
    boot: Path  # the FAT boot partition
    console: Path | None  # None: every active console (HDMI and serial on a Pi)

    def etc(self, name: str) -> Path:
        return self.root / "etc" / name

    @property
    def config_dir(self) -> Path:
        return self.root / "etc/edgellm"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/edgellm"

    @property
    def live(self) -> bool:
        """Change the running system too (host name, partitions): only on the box itself."""
        return self.root == Path("/")


def run(layout: Layout) -> list[str]:
    """Make the box itself; returns what was done, one line each (no secrets in them)."""
    if (layout.state_dir / STAMP).exists():
        return ["first boot was done before: nothing to do"]
    done: list[str] = []
    problems: list[str] = []
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    _own(layout.state_dir)
    device = device_id(layout.state_dir)
    _own(layout.state_dir / "device-id")
    hostname = f"edgellm-{device[:4]}"
    _set_hostname(layout, hostname)
    done.append(f"host name {hostname}, device id {device}")

    seed = layout.boot / SEED_DIR
    done += _install_config(layout, seed, problems)
    keys = {}
    for name in ("api-keys", "admin-keys"):
        keys[name], line = _install_keys(layout, seed, name, problems)
        done.append(line)
    done += _install_trusted_keys(layout, seed, problems)

    config_file = layout.config_dir / "edgellm.toml"
    server = load(config_file).server if config_file.exists() else ServerConfig()
    fingerprint, line = _certificate(layout, server, hostname, problems)
    done.append(line)
    note = _key_note(hostname, server.port, keys, fingerprint, problems)
    write_atomic(layout.boot / KEY_FILE, note, mode=0o600)
    done.append(f"host name, address, keys and fingerprint written to the boot partition as {KEY_FILE}")
    _to_console(layout.console, note)
    layout.etc("issue.d").mkdir(parents=True, exist_ok=True)  # shown above the console's login prompt
    scheme = "https" if fingerprint else "http"
    pinned = f"\nTLS fingerprint: {fingerprint}" if fingerprint else ""
    write_atomic(layout.etc("issue.d/edgellm.issue"),
                 f"edgellm: {scheme}://{hostname}.local:{server.port}/v1 (API key: {KEY_FILE} on the boot partition)"
                 f"{pinned}\n\n")
    if layout.live:
        done.append(grow_root())
    write_atomic(layout.state_dir / STAMP, f"{hostname}\n")
    done += [f"problem: {p}" for p in problems]
    return done


# --- identity -------------------------------------------------------------------------------


def _set_hostname(layout: Layout, hostname: str) -> None:
    write_atomic(layout.etc("hostname"), hostname + "\n")
    hosts = layout.etc("hosts")
    lines = hosts.read_text().splitlines() if hosts.exists() else ["127.0.0.1\tlocalhost"]
    lines = [line for line in lines if not line.startswith("127.0.1.1")]
    write_atomic(hosts, "\n".join([*lines, f"127.0.1.1\t{hostname}"]) + "\n")
    if layout.live:
        socket.sethostname(hostname)


# --- what the operator pre-seeded, and what is made here ------------------------------------


def _install_config(layout: Layout, seed: Path, problems: list[str]) -> list[str]:
    source = seed / "edgellm.toml"
    if not source.exists():
        return []
    try:
        seeded = load(source)
        text = source.read_text()
        if not seeded.bundles.trusted_keys:
            # Else the service would trust keys in its own state dir, which it can write: the keys
            # that decide what installs stay root's, whatever the operator's file says.
            text = _with_trusted_keys(text)
            load_text(text, str(source))
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        problems.append(f"the pre-seeded edgellm.toml was not installed, the image's own is used: {e}")
        return []
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.config_dir / "edgellm.toml", text, mode=0o600)  # it may hold keys: root's alone
    return ["edgellm.toml installed from the boot partition"]


def load_text(text: str, source: str) -> None:
    """Check a config's text as load() checks a file."""
    import tomllib

    try:
        from_dict(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None


def _with_trusted_keys(text: str) -> str:
    """The config with [bundles] trusted_keys set to the root-owned directory."""
    line = f'trusted_keys = "{TRUSTED_KEYS}"  # added at first boot: root\'s directory'
    lines = text.splitlines()
    for i, current in enumerate(lines):
        if re.fullmatch(r"\s*\[\s*bundles\s*\]\s*(#.*)?", current):
            return "\n".join([*lines[:i + 1], line, *lines[i + 1:]]) + "\n"
    return text.rstrip("\n") + f"\n\n[bundles]\n{line}\n"


def _install_keys(layout: Layout, seed: Path, name: str, problems: list[str]) -> tuple[list[str], str]:
    """Pre-seeded keys win over any made before; otherwise keep what exists; otherwise make one."""
    target = layout.config_dir / name
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    if (seed / name).exists():
        try:
            keys = sorted(read_keys((), str(seed / name), f"boot partition {SEED_DIR}/{name}"))
        except ConfigError as e:
            problems.append(str(e))
            keys = []
        bad = [k for k in keys if not _valid_key(k)]
        if bad or not keys:
            problems.append(f"{SEED_DIR}/{name} on the boot partition was not used: it needs one key per line, "
                            "16 to 200 printable characters without spaces")
        else:
            write_atomic(target, "\n".join(keys) + "\n", mode=0o600)
            return keys, f"{name} installed from the boot partition"
    if target.exists():
        return sorted(read_keys((), str(target), name)), f"{name} kept"
    prefix = "sk-edgellm-admin-" if name == "admin-keys" else "sk-edgellm-"
    key = prefix + secrets.token_urlsafe(24)
    write_atomic(target, f"# made by edgellm-firstboot; one key per line\n{key}\n", mode=0o600)
    return [key], f"{name} generated"


def _valid_key(key: str) -> bool:
    return 16 <= len(key) <= 200 and key.isprintable() and not any(c.isspace() for c in key)


def _install_trusted_keys(layout: Layout, seed: Path, problems: list[str]) -> list[str]:
    done = []
    directory = layout.config_dir / "trusted-keys"  # root's: whoever writes here decides what installs
    for source in sorted((seed / "trusted-keys").glob("*.pub")):
        try:
            read_public_key(source)
        except SignatureError as e:
            problems.append(f"trusted key {source.name} was not installed: {e}")
            continue
        directory.mkdir(mode=0o755, exist_ok=True)
        write_atomic(directory / source.name, source.read_bytes())
        done.append(f"trusted bundle key {source.name} installed")
    return done


def _certificate(layout: Layout, server: ServerConfig, hostname: str, problems: list[str]) -> tuple[str, str]:
    """The box's TLS certificate, made once (kept across a re-run after a power cut); returns
    its fingerprint ("" when the API speaks plain HTTP) and what was done."""
    directory = tls.Directory(layout.config_dir / "tls")
    directory.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the service's unit loads it, even empty
    if isinstance(server.tls, TLSFiles):
        try:
            return tls.fingerprint(Path(server.tls.cert).read_bytes()), f"TLS with {server.tls.cert}"
        except (OSError, tls.TLSError) as e:
            problems.append(f"[server] tls cert {server.tls.cert}: {e}")
            return "", "no TLS fingerprint: the configured certificate cannot be read"
    if server.tls == "off" or is_loopback(server.host):
        return "", "no TLS certificate: the API speaks plain HTTP ([server] tls, host)"
    if directory.exists():
        return directory.presented().fingerprint, "TLS certificate kept"
    return directory.make(tls.box_names(hostname)), "TLS certificate generated"


def _own(path: Path) -> None:
    """State files belong to the service's user, where there is one (on the box)."""
    try:
        user = pwd.getpwnam("edgellm")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


# --- telling the operator -------------------------------------------------------------------


def _key_note(hostname: str, port: int, keys: dict[str, list[str]], fingerprint: str, problems: list[str]) -> str:
    url = f"{'https' if fingerprint else 'http'}://{hostname}.local:{port}/v1"
    lines = [
        "edgellm on this card",
        "",
        f"Host name: {hostname} (on the LAN: {hostname}.local)",
        f"API:       {url}",
        "",
    ]
    if fingerprint:
        lines += [
            "TLS fingerprint (the box's own certificate: no authority signs it, so pin this; a box",
            "that presents another is not this one, whatever its name):",
            f"  {fingerprint}",
            f"  curl:   curl -k --pinnedpubkey '{fingerprint}' {url}/models -H 'Authorization: Bearer KEY'",
            f"  Python: edgellm.discovery.find_base_url(fingerprint='{fingerprint}')",
            "",
        ]
    lines += [
        "API key (Authorization: Bearer KEY; OpenAI SDKs: api_key=KEY):",
        *[f"  {k}" for k in keys["api-keys"]],
        "",
        "Admin key (the /admin API: load and unload models, upload bundles):",
        *[f"  {k}" for k in keys["admin-keys"]],
        "",
        "To change them: edit /etc/edgellm/api-keys or admin-keys on the box, or put your own",
        f"files named api-keys and admin-keys in a folder {SEED_DIR}/ on this partition before the",
        "first boot of a freshly flashed card.",
    ]
    if problems:
        lines += ["", "Problems at first boot:", *[f"  - {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def _to_console(console: Path | None, note: str) -> None:
    """To the screen and the serial port alike: /dev/console is only the last console= of the
    kernel's command line, and the operator may be looking at the other."""
    if console is None:
        try:
            names = Path("/sys/class/tty/console/active").read_text().split()
        except OSError:
            names = ["console"]
        targets = [Path("/dev") / name for name in names]
    else:
        targets = [console]
    for target in targets:
        try:
            with open(target, "a") as f:
                f.write("\n" + note + "\n")
        except OSError:
            pass  # no such console (a headless board): the boot partition has the note


# --- the data partition ---------------------------------------------------------------------


def grow_root() -> str:
    """Grow the partition holding / (when it is the disk's last) and its ext4 to the end of the card."""
    st = os.stat("/")
    sysfs = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    if not (sysfs / "partition").exists():
        return "root is not on a partition: nothing to grow"
    number = int((sysfs / "partition").read_text())
    disk = sysfs.parent
    start, size = int((sysfs / "start").read_text()), int((sysfs / "size").read_text())
    later = [p for p in disk.iterdir() if (p / "start").exists() and int((p / "start").read_text()) > start]
    free = int((disk / "size").read_text()) - (start + size)
    if later or free < 2048:  # another partition after it, or less than 1 MiB to gain
        return "root partition already fills the card"
    grow_partition(Path("/dev") / disk.name, number)
    _run(["partx", "--update", "--nr", str(number), f"/dev/{disk.name}"])  # the kernel learns the new size
    _run(["resize2fs", f"/dev/{sysfs.name}"])  # online
    grown = shutil.disk_usage("/").total / 2**30
    return f"root partition /dev/{sysfs.name} grown to the end of the card ({grown:.1f} GiB)"


def grow_partition(disk: Path, number: int) -> None:
    """Extend partition `number` of `disk` (a device or an image file) to the end; start unchanged."""
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", str(number), str(disk)], input=", +\n")


def _run(command: list[str], input: str = "") -> None:
    result = subprocess.run(command, input=input, text=True, capture_output=True)
    if result.returncode != 0:
        raise FirstBootError(f"{' '.join(command)} failed: {result.stderr.strip()}")

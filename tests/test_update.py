"""Signed software updates with two (and three) real builds of edgellm made from this tree: create,
sign, verify and apply an update; tampered, unsigned, wrongly signed and downgrading updates
refused with nothing changed; a version whose service cannot start (and that migrated the
catalog first) rolled back by itself; SIGKILL at every step of an apply leaving a box that runs;
the USB import and POST /admin/update staging an update that root then applies.

The box is a directory laid out as the appliance's /opt/edgellm (systemd/install.sh makes its
first version current), its service run by tests/supervisor.py, which does for it what systemd
does for edgellm.service."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from builds import wheel_dir, wheelhouse
from conftest import ROOT, wait_until
from test_cli import assert_one_line_error, edgellm

from edgellm.update.layout import Layout

pytestmark = pytest.mark.skipif(wheelhouse() is None, reason="no wheelhouse: make test collects it (tests/builds.py)")

OLD, NEW, BROKEN = "0.2.0", "0.3.0", "0.4.0"
SUPERVISOR = ROOT / "tests" / "supervisor.py"
# The box's own processes run its installed versions: not this tree, which conftest.py puts first.
BOX_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (state, config, keys) with its SHA-256: what must not change."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


class Box:
    """ROOT/opt/edgellm with versions side by side, ROOT/etc/edgellm, ROOT/var/lib/edgellm, and the
    service under the supervisor."""

    def __init__(self, root: Path, keys: Path) -> None:
        self.root = root
        self.opt = root / "opt" / "edgellm"
        self.state = root / "var" / "lib" / "edgellm"
        self.etc = root / "etc" / "edgellm"
        self.layout = Layout(self.opt)
        self.keys = keys
        self.port = free_port()
        self.config = root / "edgellm.toml"
        self.run_dir = root / "supervisor"
        self.log = self.run_dir / "service.log"
        self.supervisor: subprocess.Popen | None = None
        self.write_config()

    def write_config(self, **update: str) -> None:
        control = json.dumps([sys.executable, str(SUPERVISOR), "control", str(self.run_dir)])
        settings = {"root": f'"{self.opt}"', "control": control, "health_timeout": '"60s"', "settle": '"1s"',
                    **update}
        self.config.write_text(textwrap.dedent(f"""\
            [server]
            host = "127.0.0.1"
            port = {self.port}
            state_dir = "{self.state}"
            [bundles]
            trusted_keys = "{self.etc / 'trusted-keys'}"
            [update]
            """) + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def start(self) -> None:
        self.run_dir.mkdir(exist_ok=True)
        (self.run_dir / "pid").unlink(missing_ok=True)
        self.supervisor = subprocess.Popen([sys.executable, str(SUPERVISOR), "run", str(self.opt), str(self.config),
                                            str(self.run_dir)], start_new_session=True, env=BOX_ENV)
        wait_until(lambda: (self.run_dir / "pid").exists(), 10, message="the supervisor to start")

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.terminate()
            self.supervisor.wait(30)
            self.supervisor = None

    def reboot(self) -> None:
        """The service starts afresh on whatever `current` names (as at a boot)."""
        subprocess.run([sys.executable, str(SUPERVISOR), "control", str(self.run_dir), "restart"], check=True,
                       timeout=60)

    def health(self) -> dict | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def serving(self, version: str, timeout: float = 120) -> dict:
        return wait_until(lambda: (h := self.health()) and h.get("version") == version and h, timeout, 0.2,
                          f"version {version} to answer /health\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(the service wrote no log)"

    def update(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return edgellm("update", *args, "--config", str(self.config), timeout=timeout)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """The box's own edgellm (ROOT/bin), as its units run it."""
        return subprocess.run([str(self.opt / "bin" / "edgellm"), *args], capture_output=True, text=True, timeout=300,
                              env=BOX_ENV)

    def runnable(self) -> str:
        """The version `current` names: a complete install that runs."""
        current = self.layout.current()
        assert current is not None and self.layout.installed(current), current
        shown = self.run("--version")
        assert shown.stdout.strip() == f"edgellm {current}", shown
        return current


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The builds, the keys, and a box with OLD installed by hand and made current by install.sh."""
    tmp = tmp_path_factory.mktemp("update")
    for name in ("vendor", "site"):
        assert edgellm("keygen", "-o", str(tmp / name)).returncode == 0
    wheels = {OLD: wheel_dir(OLD, tmp), NEW: wheel_dir(NEW, tmp), BROKEN: wheel_dir(BROKEN, tmp, migrates=True)}
    root = tmp / "box"
    opt = root / "opt" / "edgellm"
    subprocess.run([sys.executable, "-m", "venv", str(opt / "versions" / OLD)], check=True)
    subprocess.run([str(opt / "versions" / OLD / "bin" / "pip"), "install", "--quiet", "--no-index",
                    "--find-links", str(wheels[OLD]), f"edgellm=={OLD}"], check=True,
                   env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    installed = subprocess.run(["sh", str(ROOT / "systemd" / "install.sh"), str(root)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    trusted = root / "etc" / "edgellm" / "trusted-keys"
    shutil.copy(tmp / "vendor.pub", trusted / "vendor.update.pub")
    shutil.copy(tmp / "site.pub", trusted / "site.pub")
    bundles = {}
    for version, directory in wheels.items():
        bundles[version] = tmp / f"edgellm-{version}.edgellm"
        made = edgellm("update", "create", str(directory), "-o", str(bundles[version]), "--key",
                       str(tmp / "vendor.key"), "--min-from", "0.2.0")
        assert made.returncode == 0, made.stderr
    snapshot = tmp / "snapshot"
    shutil.copytree(root, snapshot, symlinks=True)
    return {"tmp": tmp, "root": root, "snapshot": snapshot, "bundles": bundles, "wheels": wheels}


@pytest.fixture
def box(built) -> Box:
    """The box as install.sh left it (OLD current), its service up."""
    root = built["root"]
    shutil.rmtree(root)
    shutil.copytree(built["snapshot"], root, symlinks=True)  # the same path: the venvs' scripts name it
    box = Box(root, built["tmp"])
    box.start()
    try:
        box.serving(OLD)
        yield box
    finally:
        box.stop()


def test_install_makes_the_first_version_current(box):
    assert os.readlink(box.opt / "current") == f"versions/{OLD}"
    assert os.readlink(box.opt / "bin") == "current/bin"
    assert box.runnable() == OLD


def test_create_verify_and_apply_an_update(box, built):
    bundle = built["bundles"][NEW]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgellm-update" and manifest["edgellm_version"] == NEW
    assert manifest["min_from_version"] == "0.2.0"
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    names = {f["name"] for f in manifest["files"]}
    assert names == {p.name for p in built["wheels"][NEW].iterdir()}
    assert any(n.startswith("llama_cpp_python-") for n in names)
    for f in manifest["files"]:  # every file's SHA-256, checked by hashlib
        assert hashlib.sha256((bundle / "files" / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    if shutil.which("minisign"):  # the signature, checked by minisign itself
        checked = subprocess.run(["minisign", "-V", "-p", str(built["tmp"] / "vendor.pub"), "-m",
                                  str(bundle / "manifest.json")], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr

    verified = box.update("verify", str(bundle))
    assert verified.returncode == 0, verified.stderr
    assert f"edgellm {NEW}" in verified.stdout and f"this box runs {OLD}" in verified.stdout

    state_before, etc_before = tree(box.state), tree(box.etc)
    applied = box.update("apply", str(bundle))
    assert applied.returncode == 0, applied.stderr
    assert f"edgellm {NEW} is up and healthy: updated from {OLD}" in applied.stderr
    health = box.serving(NEW, timeout=5)
    assert health["update"]["state"] == "updated"
    assert (health["update"]["from"], health["update"]["to"]) == (OLD, NEW)
    assert box.runnable() == NEW and box.layout.trial() is None
    assert box.layout.installed(OLD)  # the one before stays, to go back to by hand
    assert not box.layout.incoming.exists() and not box.layout.saved.exists()
    assert tree(box.etc) == etc_before  # config, keys, TLS: untouched
    assert tree(box.state) == state_before  # the model store: untouched

    again = box.update("apply", str(bundle))  # the same update again: nothing to do, no restart
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert box.health()["uptime_seconds"] >= health["uptime_seconds"]

    status = json.loads(box.update("status").stdout)
    assert status["current"] == NEW and status["trial"] is None and status["last"]["state"] == "updated"


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """An apply's refusal: its progress lines, then one line that says why; never a traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("edgellm: ") and all(f in line for f in fragments), line
    return line


def tampered_copy(bundle: Path, tmp: Path, how: str) -> Path:
    copy = tmp / f"{how}.edgellm"
    shutil.copytree(bundle, copy)
    if how == "tampered":
        wheel = next((copy / "files").glob("edgellm-*.whl"))
        data = bytearray(wheel.read_bytes())
        data[len(data) // 2] ^= 1
        wheel.write_bytes(bytes(data))
    elif how == "unsigned":
        (copy / "manifest.json.minisig").unlink()
    elif how == "edited":
        manifest = copy / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"min_from_version": "0.2.0"', '"min_from_version": "0.1.0"'))
    return copy


@pytest.mark.parametrize("how, expected", [
    ("tampered", "does not match the manifest's SHA-256"),
    ("unsigned", "not signed"),
    ("edited", "bad signature"),
])
def test_a_bad_update_is_refused_and_nothing_changes(box, built, tmp_path, how, expected):
    bundle = tampered_copy(built["bundles"][NEW], tmp_path, how)
    opt_before, state_before = tree(box.opt), tree(box.state)
    assert_one_line_error(box.update("verify", str(bundle)), expected, status=1)
    refused(box.update("apply", str(bundle)), expected)
    assert box.runnable() == OLD and box.layout.trial() is None
    assert not box.layout.version_dir(NEW).exists()
    after = tree(box.opt)
    assert after.pop("status.json", None) is not None  # the refusal is reported ...
    assert after == {k: v for k, v in opt_before.items() if k != "status.json"}  # ... and nothing else changed
    assert tree(box.state) == state_before
    assert box.layout.status()["state"] == "refused" and expected in box.layout.status()["message"]
    assert box.health()["version"] == OLD


def test_a_model_key_cannot_sign_software_unless_configured(box, built, tmp_path):
    bundle = tmp_path / "site-signed.edgellm"
    made = edgellm("update", "create", str(built["wheels"][NEW]), "-o", str(bundle), "--key",
                   str(built["tmp"] / "site.key"), "--min-from", "0.2.0")
    assert made.returncode == 0, made.stderr
    refused = box.update("verify", str(bundle))
    assert_one_line_error(refused, "not trusted here", "NAME.update.pub", status=1)
    box.write_config(model_keys="true")
    assert box.update("verify", str(bundle)).returncode == 0
    # ... and an update key signs no models: it is not among the keys a model bundle is checked with.
    from edgellm.bundles import signing

    model_keys, _ = signing.trusted_keys(box.etc / "trusted-keys")
    assert [k.source for k in model_keys] == [str(box.etc / "trusted-keys" / "site.pub")]


def test_downgrades_are_refused_unless_forced(box, built, tmp_path):
    assert box.update("apply", str(built["bundles"][NEW])).returncode == 0
    box.serving(NEW, timeout=5)
    refused(box.update("apply", str(built["bundles"][OLD])), f"edgellm {OLD} is older than the {NEW}",
            "--allow-downgrade")
    assert box.runnable() == NEW
    forced = box.update("apply", str(built["bundles"][OLD]), "--allow-downgrade")
    assert forced.returncode == 0, forced.stderr  # installed already (the one before): switched back to
    box.serving(OLD, timeout=5)


def test_too_old_a_box_is_told_to_update_in_between(box, built, tmp_path):
    bundle = tmp_path / "needs-newer.edgellm"
    made = edgellm("update", "create", str(built["wheels"][NEW]), "-o", str(bundle), "--key",
                   str(built["tmp"] / "vendor.key"), "--min-from", "0.2.5")
    assert made.returncode == 0
    refused(box.update("apply", str(bundle)), "updates 0.2.5 or newer", f"runs {OLD}")


def test_a_version_that_cannot_start_is_rolled_back_with_the_catalog_it_migrated(box, built, models):
    assert edgellm("models", "add", str(models["scripted"]), "--state-dir", str(box.state)).returncode == 0
    catalog = box.state / "models" / "catalog.json"
    before = catalog.read_bytes()
    box.write_config(health_timeout='"15s"')
    refused(box.update("apply", str(built["bundles"][BROKEN])), f"rolled back to {OLD}: {BROKEN} did not answer "
            "/health", "the model catalog was put back")
    health = box.serving(OLD)  # the old version serves again, the model with it
    assert health["update"]["state"] == "rolled-back" and health["update"]["to"] == BROKEN
    assert catalog.read_bytes() == before
    listed = httpx.get(f"http://127.0.0.1:{box.port}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["scripted"]
    assert box.runnable() == OLD and box.layout.trial() is None
    assert box.layout.installed(BROKEN)  # kept: applying it again would not rebuild it


CRASHER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, threading
    from pathlib import Path
    from edgellm.bundles.reader import open_source
    from edgellm.config import load
    from edgellm.update import apply
    config_path, bundle, k, during = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    steps = []
    def step(what, detail):
        steps.append(f"{what} {detail}")
        if len(steps) == k:
            if during == "yes" and what == "run":  # in the middle of that command, not before it
                threading.Timer(1.0, os.killpg, (0, signal.SIGKILL)).start()
                return
            os.killpg(0, signal.SIGKILL)
    def crashing(module, name):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            step(name, os.path.basename(str(args[-1] if args else "")))
            return real(*args, **kwargs)
        setattr(module, name, wrapper)
    for name in ("replace", "rename", "symlink", "unlink", "fsync", "mkdir", "rmdir"):
        crashing(os, name)
    real_run = subprocess.run
    def run(command, *args, **kwargs):
        step("run", " ".join(os.path.basename(str(c)) for c in command[:4]))
        return real_run(command, *args, **kwargs)
    subprocess.run = run
    source = open_source(bundle)
    try:
        apply.apply(source, load(config_path), say=lambda m: None)
    except Exception as e:
        print(f"refused: {e}", file=sys.stderr)
    print(json.dumps(steps))
""")


def test_sigkill_at_every_step_of_an_apply_leaves_a_box_that_runs(box, built):
    """Kill the apply, and whatever it started, at each step: before each link made or renamed,
    file synced, directory made or removed, and command run (the venv, pip, the checks, the
    service's restart and stop), and once in the middle of pip's install. After each kill the box
    runs a complete version and serves it after a restart (a reboot); the boot's check (resume,
    with the trial version's own code) then settles it, and applying again completes the update.
    Runs of one kind of step (an fsync per wheel copied) are sampled: each is that step again,
    on another file."""
    bundle = built["bundles"][NEW]
    stash = box.root.parent / "stash"

    def crash(k: int, during: bool = False) -> list[str] | None:
        result = subprocess.run([sys.executable, "-c", CRASHER, str(box.config), str(bundle), str(k),
                                 "yes" if during else "no"], capture_output=True, text=True, timeout=600,
                                start_new_session=True)
        if result.returncode == -signal.SIGKILL:
            return None
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def settle_as_at_boot() -> str:
        version = box.runnable()
        if box.layout.trial() is not None or version != OLD:  # else cut before the switch: OLD runs on
            box.reboot()
        box.serving(version)
        trial = box.layout.trial()
        binary = box.opt / "trial" / "bin" / "edgellm" if trial else box.opt / "bin" / "edgellm"
        resumed = subprocess.run([str(binary), "update", "resume", "--config", str(box.config)], capture_output=True,
                                 text=True, timeout=300, env=BOX_ENV)
        assert resumed.returncode == 0, resumed.stderr
        assert box.layout.trial() is None and not box.layout.incoming.exists()
        kept = box.runnable()
        box.serving(kept)
        return kept

    def sample(steps: list[str]) -> list[int]:
        """Every step, but of a run of the same kind of step (the copy's fsync of each wheel, the
        unlink of each file as the copy is deleted) only the first and the last."""
        runs: list[list[int]] = []
        for k, name in enumerate(steps, 1):
            if runs and steps[runs[-1][0] - 1].split()[0] == name.split()[0]:
                runs[-1].append(k)
            else:
                runs.append([k])
        return sorted({k for run in runs for k in (run[0], run[-1])})

    def reset(new_installed: bool) -> None:
        """OLD current, nothing on trial; NEW installed beside it or not (kept aside: no rebuild)."""
        new = box.layout.version_dir(NEW)
        box.layout.point("current", OLD)
        box.layout.drop("trial")
        for path in (box.layout.incoming, box.layout.saved, box.layout.status_file):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if new.exists() and not box.layout.installed(NEW):
            shutil.rmtree(new)
        if new.exists() and not new_installed:
            shutil.rmtree(new) if stash.exists() else os.rename(new, stash)
        elif new_installed and not new.exists():
            os.rename(stash, new)
        assert sorted(p.name for p in box.layout.versions.iterdir()) == sorted([OLD, *([NEW] if new_installed else [])])
        if (box.health() or {}).get("version") != OLD:  # the point before left NEW running
            box.reboot()
            box.serving(OLD)

    full = crash(0)  # counted whole, from a box without the new version: the install's steps among them
    assert full is not None and box.runnable() == NEW
    reset(new_installed=True)
    quick = crash(0)  # the new version installed already (an update cut off after its install)
    assert quick is not None and box.runnable() == NEW
    shared = next(i for i, (a, b) in enumerate(zip(full, quick, strict=False)) if a != b)
    install = range(shared + 1, shared + len(full) - len(quick) + 1)  # steps are counted from 1
    assert any(full[k - 1].startswith("run python -m pip") for k in install), full
    pip = next(k for k in install if full[k - 1].startswith("run python -m pip"))
    marker = next(k for k in install if full[k - 1].startswith("replace edgellm-installed.json"))
    # The install's steps up to pip's, pip cut in the middle, and its marker made: each step after
    # pip's costs a whole pip install, and those before the marker all leave the same debris.
    points = [(k, False, False) for k in install if k <= pip] + [(pip, True, False), (marker, False, False),
                                                                 (install[-1], False, False)]
    points += [(k, False, True) for k in sample(quick)]
    kept = set()
    for n, (k, during, new_installed) in enumerate(points):
        reset(new_installed)
        assert crash(k, during) is None, f"step {k} ({(quick if new_installed else full)[k - 1]}) was not reached"
        assert box.runnable() in (OLD, NEW)
        kept.add(settle_as_at_boot())
        if new_installed and n % 10 == 0:  # and it can simply be applied again
            assert crash(0) is not None and box.runnable() == NEW
            box.serving(NEW)
    assert kept == {OLD, NEW}  # cut before the switch: the old; after it: the new, once checked
    assert len(points) >= 30


def test_a_stick_and_an_upload_stage_updates_that_root_applies(box, built, tmp_path):
    # The USB import (edgellm bundle import of the stick's root, as the edgellm user) stages it.
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copytree(built["bundles"][NEW], stick / "edgellm-update")
    imported = box.run("bundle", "import", str(stick), "--config", str(box.config))  # the box's own edgellm
    assert imported.returncode == 0, imported.stderr
    assert f"staged edgellm {NEW}" in imported.stdout
    pending = box.state / "updates" / "pending"
    assert (pending / "bundle" / "manifest.json").is_file()
    assert box.runnable() == OLD  # staged, not applied: that is root's (edgellm-update.service)
    applied = box.update("apply", "--pending")
    assert applied.returncode == 0, applied.stderr
    box.serving(NEW)
    assert not pending.exists()

    # POST /admin/update: the tar stream, verified as it arrives, staged with progress events.
    tar = tmp_path / "update.tar"
    assert edgellm("update", "create", str(built["wheels"][OLD]), "-o", str(tar), "--key",
                   str(built["tmp"] / "vendor.key"), "--min-from", "0.2.0").returncode == 0
    url = f"http://127.0.0.1:{box.port}/admin/update"
    with open(tar, "rb") as f:
        refused = httpx.post(url, content=f.read(), timeout=120)
    events = [json.loads(line[6:]) for line in refused.text.splitlines() if line.startswith("data: ")]
    assert "older than" in events[-1]["error"]["message"] and not pending.exists()
    with open(tar, "rb") as f:
        staged = httpx.post(url + "?allow_downgrade=true", content=f.read(), timeout=120)
    events = [json.loads(line[6:]) for line in staged.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["staged"] is True and events[-1]["version"] == OLD, events[-1]
    assert any("done" in e and "total" in e for e in events[:-1])  # progress
    assert json.loads((pending / "options.json").read_text()) == {"allow_downgrade": True}
    tampered = bytearray(tar.read_bytes())
    tampered[-20000] ^= 1
    bad = httpx.post(url, content=bytes(tampered), timeout=120)
    assert "error" in bad.text and (pending / "options.json").is_file()  # the staged one stays as it was
    applied = box.update("apply", "--pending")
    assert applied.returncode == 0, applied.stderr
    box.serving(OLD)


def test_a_stick_with_the_running_version_changes_nothing(box, built):
    imported = box.run("bundle", "import", str(built["bundles"][OLD]), "--config", str(box.config))
    assert imported.returncode == 0 and "unchanged" in imported.stdout
    assert not (box.state / "updates" / "pending").exists()

"""Apply an update: install the new version beside the running one, switch the `current` link,
restart the service, and keep the new version only if it comes back healthy; otherwise switch
back, by itself, and say why.

The steps, each leaving a runnable box if the power goes at any instant (layout.py):

1. verify the bundle (signature, versions, Python, CPU) and copy it into ROOT/incoming,
   hashing each file in the same pass: what is installed is what was signed, whoever can
   write where it came from;
2. build versions/NEW as a venv from those wheels alone (`pip --no-index`), check that it
   imports llama.cpp on this CPU, then write its INSTALLED marker;
3. save the state files the new version might migrate (ROOT/saved), point `trial` at the
   running version, then `current` at the new one, and restart the service;
4. watch /health on loopback: the new version must answer ok within [update] health_timeout
   and stay up, not restarted, for [update] settle;
5. kept: drop `trial`, delete versions older than the one before; or rolled back: stop the
   service, point `current` at the old version again, put back saved state it cannot read,
   drop `trial`, start it, and report.

A `trial` link found later (the power went during 4, or this process was killed) is settled
by `resume`: the boot unit runs it from the old version's own code, which is known to work.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgellm import __version__
from edgellm.bundles.reader import DirectorySource
from edgellm.config import Config, credential, is_loopback, read_keys
from edgellm.files import fsync_dir, write_atomic
from edgellm.progress import Progress
from edgellm.store.registry import CATALOG_VERSION, TIME_FORMAT, Registry
from edgellm.units import parse_duration
from edgellm.update import UpdateError
from edgellm.update.bundle import Source, Verified, copy, keys, verify
from edgellm.update.layout import Layout

Say = Callable[[str], None]
POLL = 1.0  # seconds between health checks
PENDING = "pending"  # STATE_DIR/updates/pending: an update staged by the service or a stick


def say_to_stderr(message: str) -> None:
    print(f"edgellm update: {message}", file=sys.stderr, flush=True)


def now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


def running_version(layout: Layout) -> str:
    current = layout.current()
    if current is None or not layout.installed(current):
        raise UpdateError(f"{layout.root}: no installed version is current here, so nothing to update (the "
                          "appliance keeps its versions under [update] root)")
    return current


def apply(source: Source, config: Config, *, allow_downgrade: bool = False, say: Say = say_to_stderr,
          progress: Progress | None = None) -> str:
    """Apply the update in `source`; returns the version now running. UpdateError when it is
    refused (nothing changed) or was rolled back (the old version runs again)."""
    layout = Layout(config.update.root)
    with layout.locked():
        _settle_trial(layout, config, say, restart=True)
        layout.clean()
        running = running_version(layout)
        trusted, skipped = keys(config)
        for warning in skipped:
            say(f"warning: {warning}")
        try:
            verified = verify(source, trusted, running=running, allow_downgrade=allow_downgrade)
        except UpdateError as e:
            _record(layout, "refused", running, "", str(e))
            raise
        new = verified.manifest.edgellm_version
        if new == running:
            say(f"{source.name}: edgellm {new} is the version this box runs already; nothing to do")
            return running
        say(f"installing edgellm {new} beside {running} (signed by key {verified.key_id})")
        _record(layout, "installing", running, new, f"installing {new}")
        try:
            copy(source, verified, layout.incoming, progress)
            _install(layout, verified)
        except (UpdateError, OSError) as e:
            layout.clean()
            message = e.message if isinstance(e, UpdateError) else f"the install failed: {e}"
            _record(layout, "refused", running, new, message)
            raise UpdateError(message) from None
        finally:
            shutil.rmtree(layout.incoming, ignore_errors=True)
        _save_state(layout, config)
        layout.point("trial", running)
        layout.point("current", new)
        _record(layout, "trying", running, new, f"switched to {new}; waiting for it to answer /health")
        say(f"switched to {new}; restarting the service and waiting for it to come back healthy")
        return _settle(layout, config, running, new, say, restart=True)


def resume(config: Config, *, say: Say = say_to_stderr) -> str | None:
    """Settle an update that was cut off after the switch (at boot: the service is starting on
    the new version already, so no restart), and delete what a cut-off install left. Returns the
    version kept, or None if none was on trial."""
    layout = Layout(config.update.root)
    with layout.locked():
        kept = _settle_trial(layout, config, say, restart=False)
        for version in layout.clean():
            say(f"deleted {layout.version_dir(version)}: an install that was cut off")
        return kept


def _settle_trial(layout: Layout, config: Config, say: Say, *, restart: bool) -> str | None:
    old, new = layout.trial(), layout.current()
    if old is None:
        return None
    if new is None or new == old or not layout.installed(new):  # cut off before the switch, or after going back
        layout.point("current", old)
        if restart:  # the service may have been stopped for the way back
            Service(config).act("restart")
        layout.drop("trial")
        say(f"an interrupted update was undone: {old} runs")
        return old
    say(f"an update to {new} was cut off before it was confirmed; checking it now")
    try:
        return _settle(layout, config, old, new, say, restart=restart)
    except UpdateError as e:
        say(str(e))
        return old


def _settle(layout: Layout, config: Config, old: str, new: str, say: Say, *, restart: bool) -> str:
    service = Service(config)
    baseline = service.restarts()
    if restart:
        service.act("restart")
    problem = watch(config, new, service, baseline)
    if problem is None:
        layout.drop("trial")
        shutil.rmtree(layout.saved, ignore_errors=True)
        layout.prune(keep=old)
        _record(layout, "updated", old, new, f"updated from {old} to {new}")
        say(f"edgellm {new} is up and healthy: updated from {old}")
        return new
    # Stopped first: no process of the new version may migrate the state again once it is put back.
    service.act("stop")
    layout.point("current", old)
    put_back = _restore_state(layout, config)
    service.act("start")
    layout.drop("trial")
    message = f"rolled back to {old}: {new} {problem}" + (f"; {put_back}" if put_back else "")
    _record(layout, "rolled-back", old, new, message)
    say(message)
    if watch(config, old, service, service.restarts(), settle=False) is not None:
        say(f"warning: {old} did not answer /health after the rollback either (journalctl -u {service.unit})")
    raise UpdateError(message)


def _record(layout: Layout, state: str, old: str, new: str, message: str) -> None:
    """The outcome for /health, the console and whoever reads status.json."""
    layout.write_status({"state": state, "from": old, "to": new, "message": message, "at": now()})


# --- install -------------------------------------------------------------------------------------

def _run(command: list[str], what: str, timeout: float = 1800) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LC_ALL": "C.UTF-8"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UpdateError(f"{what}: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise UpdateError(f"{what} failed: {last[0]}")
    return done.stdout


def base_python() -> str:
    """The board's own interpreter, which every version's venv is made from."""
    return getattr(sys, "_base_executable", "") or sys.executable


def _install(layout: Layout, verified: Verified) -> None:
    """versions/NEW from the incoming wheels alone; complete only once it runs on this CPU."""
    version = verified.manifest.edgellm_version
    target = layout.version_dir(version)
    if layout.installed(version):
        return  # kept from an update that was rolled back, or cut off after its install
    shutil.rmtree(target, ignore_errors=True)
    layout.versions.mkdir(parents=True, exist_ok=True)
    _run([base_python(), "-m", "venv", str(target)], f"making the venv {target}")
    _run([str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--no-cache-dir",
          "--find-links", str(layout.incoming / "files"), f"edgellm=={version}"],
         f"installing edgellm {version} from the bundle's wheels")
    shown = _run([str(target / "bin" / "edgellm"), "--version"], f"running edgellm {version}").strip()
    if shown != f"edgellm {version}":
        raise UpdateError(f"the installed edgellm says {shown!r}, not edgellm {version}")
    # llama.cpp's library loads on this CPU (a wrong CPU variant dies here, not in the service).
    _run([str(target / "bin" / "python"), "-c", "import llama_cpp.llama_cpp"], "loading llama.cpp")
    layout.mark_installed(version, {"version": version, "installed": now(), "signer": verified.key_id,
                                    "created": verified.manifest.created})


# --- the state's path back -------------------------------------------------------------------------

def _save_state(layout: Layout, config: Config) -> None:
    """The state files a new version may migrate to a format the old one cannot read: the model
    catalog (the blobs it names are never rewritten). Kept until the new version is confirmed."""
    shutil.rmtree(layout.saved, ignore_errors=True)
    layout.saved.mkdir(parents=True)
    catalog = Registry(config.server.state_dir).catalog
    if catalog.is_file():
        write_atomic(layout.saved / catalog.name, catalog.read_bytes())


def _restore_state(layout: Layout, config: Config) -> str:
    """After a rollback: put back the saved catalog if the new version left one newer than this
    (the old) version reads. Returns what was done, for the report."""
    catalog = Registry(config.server.state_dir).catalog
    saved = layout.saved / catalog.name
    try:
        version = json.loads(catalog.read_text()).get("version", 1)
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(version, int) and version > CATALOG_VERSION and saved.is_file():
        write_atomic(catalog, saved.read_bytes(), mode=0o640)
        os.chown(catalog, *_owner(catalog.parent))
        return f"the model catalog was put back as it was before (the new version had migrated it to format {version})"
    return ""


def _owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


# --- the service, and its health ---------------------------------------------------------------------

class Service:
    """The service being updated: systemd's unit, or the [update] control command."""

    def __init__(self, config: Config) -> None:
        self.unit = config.update.service
        self.control = list(config.update.control)

    def _systemctl(self, action: str) -> None:
        if action != "stop":
            subprocess.run(["systemctl", "reset-failed", self.unit], capture_output=True)  # a start limit hit
        _run(["systemctl", action, *(["--no-block"] if action != "stop" else []), self.unit], f"{action} {self.unit}")

    def act(self, action: str) -> None:
        """restart or start (not waiting for it to be up), or stop (returning once it is down)."""
        if self.control:
            _run([*self.control, action], f"{action} the service")
        else:
            self._systemctl(action)

    def restarts(self) -> int | None:
        """How often systemd restarted the unit after a crash (None without systemd)."""
        if self.control:
            return None
        done = subprocess.run(["systemctl", "show", "-p", "NRestarts", "--value", self.unit], capture_output=True,
                              text=True)
        return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip().isdigit() else None

    def failed(self) -> bool:
        if self.control:
            return False
        done = subprocess.run(["systemctl", "is-failed", "--quiet", self.unit], capture_output=True)
        return done.returncode == 0


class Probe:
    """GET /health on the service's own port over loopback, as an authorized client: the reply
    names the version that answers and its uptime (a restart sets it back)."""

    def __init__(self, config: Config) -> None:
        server = config.server
        host = server.host
        self.host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.port = server.port
        self.tls = server.tls != "off" and not is_loopback(host)
        found = read_keys(server.api_keys, server.api_key_file or credential("api-keys"), "[server] api_key_file")
        self.key = min(found) if found else ""

    def get(self) -> tuple[int, dict]:
        if self.tls:  # the box's own service over loopback: its certificate is not what is checked here
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(self.host, self.port, timeout=5,
                                                                                 context=context)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            connection.request("GET", "/health", headers={"Authorization": f"Bearer {self.key}"} if self.key else {})
            response = connection.getresponse()
            body = response.read(1 << 16)
        finally:
            connection.close()
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        return response.status, data if isinstance(data, dict) else {}


def watch(config: Config, version: str, service: Service, baseline: int | None, *, settle: bool = True) -> str | None:
    """None once `version` answers /health ok and (with `settle`) stays up for [update] settle;
    otherwise what went wrong, once [update] health_timeout has passed or the service crashed
    again and again."""
    probe = Probe(config)
    deadline = time.monotonic() + (parse_duration(config.update.health_timeout) or 900.0)  # never None: config.py
    hold = (parse_duration(config.update.settle) or 30.0) if settle else 0.0
    healthy_since: float | None = None
    uptime = -1.0
    last = "did not answer /health"
    while time.monotonic() < deadline or healthy_since is not None:
        try:
            status, health = probe.get()
        except (OSError, http.client.HTTPException) as e:
            status, health = 0, {}
            last = f"did not answer /health ({e})"
        restarts = service.restarts()
        if baseline is not None and restarts is not None and restarts - baseline >= 2:
            return f"crashed {restarts - baseline} times"
        if service.failed():
            return f"failed to start (systemctl status {service.unit})"
        if status == 200 and health.get("version") == version:
            up = float(health.get("uptime_seconds", 0.0))
            if healthy_since is not None and up < uptime:
                return "restarted after it had answered /health (it crashed)"
            uptime = up
            healthy_since = healthy_since if healthy_since is not None else time.monotonic()
            if time.monotonic() - healthy_since >= hold:
                return None
        elif healthy_since is not None:
            return f"stopped answering /health after it had ({last if status == 0 else f'status {status}'})"
        elif status:
            last = (f"answered /health as version {health.get('version')}" if status == 200 else
                    f"answered /health with status {status}")
        time.sleep(POLL)
    return f"{last} within {config.update.health_timeout}"


# --- staged updates: from the service's upload and the USB import, applied by root ----------------

def pending_dir(config: Config) -> Path:
    return Path(config.server.state_dir) / "updates" / PENDING


def running_here(config: Config) -> str:
    """The version this box runs: the current one of [update] root, else this process's own."""
    return Layout(config.update.root).current() or __version__


def stage(source: Source, config: Config, *, running: str, allow_downgrade: bool = False,
          progress: Progress | None = None) -> Verified | None:
    """Verify an update and copy it into STATE_DIR/updates/pending, where edgellm-update.service
    (root) picks it up: the unprivileged side (the service, the USB import) never installs code.
    None when it is the running version already. The root side verifies it all again."""
    trusted, _ = keys(config)
    verified = verify(source, trusted, running=running, allow_downgrade=allow_downgrade)
    if verified.manifest.edgellm_version == running:
        return None
    updates = pending_dir(config).parent
    updates.mkdir(parents=True, exist_ok=True)
    tmp = updates / f".staging-{os.getpid()}-{time.monotonic_ns()}"
    try:
        copy(source, verified, tmp / "bundle", progress)
        write_atomic(tmp / "options.json", json.dumps({"allow_downgrade": allow_downgrade}) + "\n")
        old = updates / f".replaced-{os.getpid()}-{time.monotonic_ns()}"
        if pending_dir(config).exists():
            os.replace(pending_dir(config), old)  # the newest staged update wins
        os.replace(tmp, pending_dir(config))
        fsync_dir(updates)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verified


def apply_pending(config: Config, *, say: Say = say_to_stderr) -> str | None:
    """Apply the staged update, if there is one, and remove it whatever the outcome (so the path
    unit that started this does not start it again). Returns the version now running."""
    pending = pending_dir(config)
    if not pending.is_dir():
        return None
    try:
        try:
            options = json.loads((pending / "options.json").read_text())
        except (OSError, ValueError):
            options = {}
        allow_downgrade = isinstance(options, dict) and options.get("allow_downgrade") is True
        source = DirectorySource(pending / "bundle")
        try:
            return apply(source, config, allow_downgrade=allow_downgrade, say=say)
        finally:
            source.close()
    finally:
        shutil.rmtree(pending, ignore_errors=True)

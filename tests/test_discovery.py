"""LAN discovery, in two network namespaces of the test's own joined by a veth pair: zeroconf
binds only the veth addresses, so nothing is multicast on the machine's real interfaces."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import wait_until
from test_cli import edgellm

from edgellm import tls
from edgellm.discovery import TXT_BUDGET, interface_addresses, txt_records


def ns(name: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, **kwargs)


@pytest.fixture
def lan():
    """A small LAN of namespaces: 'box' (10.77.0.1) and 'box2' (10.77.0.4), each joined by a
    veth pair to a bridge in 'client' (10.77.0.2), as two boxes and a laptop on one switch."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = uuid.uuid4().hex[:6]
    box, box2, client = f"edgellm-box-{tag}", f"edgellm-box2-{tag}", f"edgellm-client-{tag}"
    if subprocess.run(["ip", "netns", "add", box], capture_output=True).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    subprocess.run(["ip", "netns", "add", box2], check=True)
    subprocess.run(["ip", "netns", "add", client], check=True)
    try:
        bridge = f"br{tag}"
        commands = [["ip", "-n", client, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0"],
                    ["ip", "-n", client, "addr", "add", "10.77.0.2/24", "dev", bridge],
                    ["ip", "-n", client, "link", "set", bridge, "up"],
                    ["ip", "-n", client, "link", "set", "lo", "up"]]
        for name, address, end in ((box, "10.77.0.1/24", "a"), (box2, "10.77.0.4/24", "b")):
            inside, outside = f"vb{end}{tag}", f"vc{end}{tag}"
            commands += [["ip", "link", "add", inside, "netns", name, "type", "veth", "peer", "name", outside,
                          "netns", client],
                         ["ip", "-n", name, "addr", "add", address, "dev", inside],
                         ["ip", "-n", name, "link", "set", "lo", "up"],
                         ["ip", "-n", name, "link", "set", inside, "up"],
                         ["ip", "-n", client, "link", "set", outside, "master", bridge],
                         ["ip", "-n", client, "link", "set", outside, "up"]]
        for cmd in commands:
            subprocess.run(cmd, check=True)
        yield {"box": box, "box2": box2, "client": client, "box_dev": f"vba{tag}", "client_dev": bridge}
    finally:
        for name in (box, box2, client):
            subprocess.run(["ip", "netns", "delete", name])


class NetnsServer:
    def __init__(self, lan: dict, tmp: Path, state: Path, name: str, where: str = "box") -> None:
        (tmp / "edgellm.toml").write_text(f'[server]\nhost = "0.0.0.0"\napi_keys = ["secret-key"]\n'
                                          f'[discovery]\nname = "{name}"\n')
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", lan[where], sys.executable, "-m", "edgellm", "serve",
                                      "--config", str(tmp / "edgellm.toml"), "--port", "0", "--state-dir",
                                      str(state)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: "announced as" in self.log() or self.proc.poll() is not None, 30,
                   message="the announcement")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        if not self._log.closed:
            self._log.close()


def discover(lan: dict, timeout: float = 1.5) -> list[dict]:
    result = ns(lan["client"], sys.executable, "-m", "edgellm", "discover", "--json", "--timeout", str(timeout),
                timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_txt_records_fit_one_packet():
    many = [f"model-with-a-rather-long-name-{i}" for i in range(100)]
    txt = txt_records(models=many, key_required=True, device="d" * 32, ollama=11434)
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) <= TXT_BUDGET
    assert txt["auth"] == "required" and int(txt["more"]) == 100 - len(txt["models"].split(","))
    assert "secret" not in json.dumps(txt) and txt["ollama"] == "11434"
    wide = txt_records(models=["模型" * 60, "ü" * 100], key_required=False, device="x",  # bytes, not characters
                       ollama=8080)
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in wide.items())
    assert sum(len(k) + len(v.encode()) + 2 for k, v in wide.items()) <= TXT_BUDGET
    assert txt_records(models=["a"], key_required=False, device="x", ollama=8080)["rev"] != \
        txt_records(models=["a", "b"], key_required=False, device="x", ollama=8080)["rev"]


def test_loopback_announces_nothing_by_default():
    assert interface_addresses([], "127.0.0.1") == {} and interface_addresses([], "localhost") == {}


def test_discovery_across_a_veth_pair(lan, models, tmp_path):
    state = tmp_path / "state"
    server = NetnsServer(lan, tmp_path, state, "edge box")
    try:
        started = time.monotonic()
        [box] = discover(lan)
        assert time.monotonic() - started < 2 + 1  # 1.5 s of listening and the interpreter's start
        assert box["name"] == "edge box" and box["addresses"] == ["10.77.0.1"]
        assert box["key_required"] is True and box["models"] == [] and box["version"]
        # On the LAN it speaks TLS only ([server] tls = "auto"), with a certificate of its own.
        assert box["base_url"] == f"https://10.77.0.1:{box['port']}/v1"
        assert len(box["device"]) == 32 and box["device"] == (state / "device-id").read_text().strip()
        fingerprint = tls.Directory(state / "tls").presented().fingerprint
        assert box["txt"]["tls"] == "1" and box["fingerprint"] == box["txt"]["fp"] == fingerprint
        assert box["presented_fingerprint"] == fingerprint and "as announced" in box["certificate"]
        assert "secret-key" not in json.dumps(box)
        assert box["ollama_port"] == box["port"]  # Ollama's API at /api on the same port ([ollama] port unset)
        assert f"on {lan['box_dev']}" in server.log()

        # A model installed while it runs shows in the TXT records.
        assert edgellm("models", "add", str(models["scripted"]), "--state-dir", str(state)).returncode == 0
        wait_until(lambda: [b["models"] for b in discover(lan, 1.0)] == [["scripted"]], 15,
                   message="the TXT update")
        assert "TXT records updated" in server.log()

        # The SDK helper gives a base_url and a client pinned to the certificate, for the openai SDK.
        probe = textwrap.dedent(f"""
            import openai
            from edgellm.discovery import find_base_url
            box = find_base_url("scripted", timeout=1.5, fingerprint="{fingerprint}")
            client = openai.OpenAI(base_url=box.base_url, api_key="secret-key", http_client=box.http_client())
            print(box.base_url, [m.id for m in client.models.list()])
        """)
        out = ns(lan["client"], sys.executable, "-c", probe, timeout=30)
        assert out.returncode == 0 and out.stdout.split(" ", 1)[1].strip() == "['scripted']", out.stderr

        # A second box on the LAN with the same name: one of them takes another.
        second_tmp = tmp_path / "second"
        second_tmp.mkdir()
        second = NetnsServer(lan, second_tmp, second_tmp / "state", "edge box", where="box2")
        try:
            def two() -> list[str] | None:
                found = sorted(b["name"] for b in discover(lan))
                return found if len(found) == 2 else None

            names = wait_until(two, 15, message=f"two boxes\n{second.log()}")
            assert names[0] == "edge box" and names[1].startswith("edge box") and names[1] != "edge box"
            # It has another certificate: pinning tells the boxes apart, whatever they are named.
            other = tls.Directory(second_tmp / "state" / "tls").presented().fingerprint
            assert other != fingerprint
            assert pinned_address(lan, fingerprint) == "10.77.0.1"
            assert pinned_address(lan, other) == "10.77.0.4"
            wrong = tls.fingerprint(tls.make(["x"])[0])
            refused = pinned_address(lan, wrong)
            assert "PinError" in refused and f"presents certificate {fingerprint}, not {wrong}" in refused
            assert f"presents certificate {other}, not {wrong}" in refused
            def listing() -> str | None:
                out = ns(lan["client"], sys.executable, "-m", "edgellm", "discover", "--timeout", "1.5",
                         "--fingerprint", fingerprint, timeout=30)
                return out.stdout if out.returncode == 0 and out.stdout.count("\n") == 3 else None

            listed = wait_until(listing, 15, message="both boxes listed")
            assert f"{fingerprint} (pinned)" in listed and f"{other} (NOT {fingerprint}: refuse it)" in listed
            assert "10.77.0.1,10.77.0.4" not in listed  # each box its own address
            nobody = ns(lan["client"], sys.executable, "-m", "edgellm", "discover", "--timeout", "1.5",
                        "--fingerprint", wrong, timeout=30)
            assert nobody.returncode == 1 and f"no box presents {wrong}" in nobody.stderr
        finally:
            second.stop()

        # A rotation: the old certificate is presented for the grace period while the new one is
        # announced, then the new one, without a restart.
        rotated = edgellm("tls", "rotate", "--state-dir", str(state), "--grace", "4s")
        assert rotated.returncode == 0, rotated.stderr
        upcoming = rotated.stdout.split("next:")[1].split()[0]
        [box] = wait_until(lambda: [b for b in discover(lan, 1.0) if b["next_fingerprint"] == upcoming] or None, 15,
                           message="the next fingerprint in the TXT records")
        assert box["presented_fingerprint"] == fingerprint
        wait_until(lambda: presented(lan, box["port"]) == upcoming, 20, message="the new certificate")
        assert "TLS certificate rotated" in server.log()
        wait_until(lambda: [b["fingerprint"] for b in discover(lan, 1.0)] == [upcoming], 15,
                   message="the TXT records after the rotation")

        # A new address on the interface is announced.
        subprocess.run(["ip", "-n", lan["box"], "addr", "add", "10.77.0.3/24", "dev", lan["box_dev"]], check=True)
        wait_until(lambda: any("10.77.0.3" in b["addresses"] for b in discover(lan, 1.0)), 15,
                   message="the new address")
        assert "addresses changed" in server.log()

        # A clean shutdown says goodbye: a browser drops the box within 2 s.
        watcher = _watch_removal(lan)
        stopped_at = time.time()
        server.stop()
        out, _ = watcher.communicate(timeout=30)
        removed = [line for line in out.splitlines() if line.startswith("removed")]
        assert removed, out
        assert float(removed[0].split()[1]) - stopped_at < 2
    finally:
        server.stop()


def pinned_address(lan: dict, fingerprint: str) -> str:
    """Where find_base_url(fingerprint=...) goes from the client namespace, or the error it raises."""
    probe = textwrap.dedent(f"""
        from edgellm.discovery import find_base_url
        try:
            print(find_base_url(timeout=1.5, fingerprint="{fingerprint}").base_url.split("/")[2].split(":")[0])
        except LookupError as e:
            print(type(e).__name__, e)
    """)
    out = ns(lan["client"], sys.executable, "-c", probe, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def presented(lan: dict, port: int) -> str:
    out = ns(lan["client"], sys.executable, "-c", "from edgellm import tls; "
             f"print(tls.fingerprint(tls.fetch_certificate('10.77.0.1', {port})))", timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _watch_removal(lan: dict) -> subprocess.Popen:
    """A browser in the client namespace that prints when the box says goodbye."""
    script = textwrap.dedent("""
        import time
        from zeroconf import Zeroconf, ServiceBrowser, ServiceStateChange, IPVersion
        zc = Zeroconf(interfaces=["10.77.0.2"], ip_version=IPVersion.V4Only)
        seen = []
        def changed(zeroconf, service_type, name, state_change):
            if state_change is ServiceStateChange.Added:
                seen.append(name)
                print("added", time.time(), name, flush=True)
            elif state_change is ServiceStateChange.Removed:
                print("removed", time.time(), name, flush=True)
        ServiceBrowser(zc, "_edgellm._tcp.local.", handlers=[changed])
        deadline = time.time() + 20
        while time.time() < deadline and not seen:
            time.sleep(0.05)
        print("ready", flush=True)
        deadline = time.time() + 5
        while time.time() < deadline:
            time.sleep(0.05)
        zc.close()
    """)
    proc = subprocess.Popen(["ip", "netns", "exec", lan["client"], sys.executable, "-c", script],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("ready"):
        line = proc.stdout.readline()
    return proc


AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={dev}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
"""


@pytest.mark.skipif(not (shutil.which("avahi-daemon") and shutil.which("avahi-browse") and shutil.which("dbus-daemon")),
                    reason="avahi-daemon, avahi-utils and dbus are not installed (make test installs them)")
def test_avahi_sees_the_service_with_its_txt_records(lan, models, tmp_path):
    """An independent mDNS implementation: Avahi, started by the test in the client namespace
    (with a private /run, its own D-Bus), resolves the service and its TXT records."""
    state = tmp_path / "state"
    state.mkdir()
    assert edgellm("models", "add", str(models["scripted"]), "--state-dir", str(state)).returncode == 0
    server = NetnsServer(lan, tmp_path, state, "avahi test box")
    conf = tmp_path / "avahi-daemon.conf"
    conf.write_text(AVAHI_CONF.format(dev=lan["client_dev"]))
    script = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/dbus /run/avahi-daemon"
              f" && dbus-daemon --system --fork && avahi-daemon -D --no-drop-root --no-chroot -f {conf}"
              f" && sleep 1 && timeout 10 avahi-browse -rpt _edgellm._tcp; status=$?"
              f"; avahi-daemon -k; kill $(cat /run/dbus/pid) 2>/dev/null; exit $status")
    try:
        found = ""
        deadline = time.monotonic() + 20
        while "=;" not in found and time.monotonic() < deadline:  # resolved lines start with "="
            result = ns(lan["client"], "sh", "-c", script, timeout=60)
            found = result.stdout
        resolved = [line.split(";") for line in found.splitlines() if line.startswith("=")]
        assert resolved, found + result.stderr
        fields = [re.sub(r"\\(\d{3})", lambda m: chr(int(m[1])), f) for f in resolved[0]]  # avahi's escapes
        assert fields[3] == "avahi test box" and fields[4] == "_edgellm._tcp" and fields[7] == "10.77.0.1"
        txt = dict(item.strip('"').split("=", 1) for item in fields[9].split('" "'))
        assert txt["models"] == "scripted" and txt["auth"] == "required" and txt["api"] == "/v1"
        assert txt["id"] == (state / "device-id").read_text().strip()
    finally:
        server.stop()

"""The service speaks systemd's notify protocol to a real datagram socket, as systemd would
hold it: READY once the model is loaded, WATCHDOG at half of WATCHDOG_USEC, STATUS, STOPPING.
API keys come from systemd credentials ($CREDENTIALS_DIRECTORY, LoadCredential=)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest
from conftest import Server, wait_until

from edgellm.sdnotify import Notifier, _watchdog_interval


class NotifySocket:
    """What systemd listens on: a datagram socket, read at once by a thread as systemd would."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            if not data:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def poll(self) -> list[dict[str, str]]:
        return [m for _, m in list(self.messages)]

    def first(self, key: str) -> dict[str, str] | None:
        return next((m for m in self.poll() if key in m), None)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_after_the_model_loads_then_watchdog_status_and_stopping(models, tmp_path, abstract):
    address = f"@edgellm-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    systemd = NotifySocket(address)
    server = Server(models["scripted"], tmp_path, wait_ready=False,
                    env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    try:
        ready = wait_until(lambda: systemd.first("READY"), 60, message="READY=1")
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith(f"serving on {server.url}: 1 models, 1 loaded")
        # READY means serving: the model is loaded and /health says so without any waiting.
        assert httpx.get(server.url + "/health").status_code == 200
        ready_at = next(t for t, m in systemd.messages if "READY" in m)
        wait_until(lambda: sum("WATCHDOG" in m for m in systemd.poll()) >= 4, 10, message="4 watchdog pings")
        pings = [t for t, m in systemd.messages if "WATCHDOG" in m and t >= ready_at]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert all(0.1 < gap < 0.4 for gap in gaps), gaps  # half of WATCHDOG_USEC, well within it

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) in (0, -signal.SIGTERM)  # systemd counts both as a clean stop
        assert any(m.get("STOPPING") == "1" for m in systemd.poll())
    finally:
        server.stop()
        systemd.close()


def test_status_follows_requests_in_flight(models, tmp_path):
    address = str(tmp_path / "notify")
    systemd = NotifySocket(address)
    server = Server(models["scripted"], tmp_path, wait_ready=False,
                    env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    try:
        wait_until(lambda: systemd.first("READY"), 60, message="READY=1")
        # The tick-tock script never ends: the request runs until max_tokens, long enough to be seen.
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": " tick", "max_tokens": 2000, "stream": True}) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream (a hang-up)
            next(lines)
            wait_until(lambda: any("1 request in flight" in m.get("STATUS", "") for m in systemd.poll()), 10,
                       message="STATUS with the running request")
            lines.close()
        wait_until(lambda: "0 requests in flight" in [m for m in systemd.poll() if "STATUS" in m][-1]["STATUS"], 10,
                   message="STATUS after the request")
    finally:
        server.stop()
        systemd.close()


def test_no_notify_socket_means_no_messages_and_no_errors(tmp_path):
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # nothing to send to: nothing happens
    # A socket that went away is logged, not raised: systemd may be re-executing itself.
    address = str(tmp_path / "later")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.watchdog()
    notifier.status("serving")
    # The same STATUS is sent again once systemd listens: a lost change is not forgotten.
    systemd = NotifySocket(address)
    try:
        notifier.status("serving")
        wait_until(lambda: systemd.first("STATUS"), 5, message="the STATUS sent again")
        assert systemd.poll() == [{"STATUS": "serving"}]
    finally:
        notifier.close()
        systemd.close()


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process():
    pid = str(os.getpid())
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert _watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert _watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert _watchdog_interval({}) is None


def test_api_keys_from_systemd_credentials(models, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "api-keys").write_text("# made at first boot\nsk-from-credential\n")
    (credentials / "admin-keys").write_text("sk-admin-from-credential\n")
    server = Server(models["scripted"], tmp_path, api_key="sk-from-credential",
                    env={"CREDENTIALS_DIRECTORY": str(credentials)})
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert server.get("/v1/models").status_code == 200
        admin = httpx.get(server.url + "/admin/models", headers={"Authorization": "Bearer sk-admin-from-credential"})
        assert admin.status_code == 200
        assert server.get("/admin/models").status_code in (401, 403)  # inference keys never open admin
    finally:
        server.stop()

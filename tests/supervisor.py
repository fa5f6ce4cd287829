"""What systemd does for edgellm.service, for the update tests (CI has no systemd to run it).

    python tests/supervisor.py run ROOT CONFIG DIR      the supervisor
    python tests/supervisor.py control DIR ACTION       [update] control: stop, start or restart

It runs ROOT/bin/edgellm serve (through the links an update switches) and starts it again 0.5 s
after it exits (Restart=on-failure, RestartSec). `control` signals it: restart (SIGHUP), stop
(SIGUSR1; returns once the service is down, as `systemctl stop` does), start (SIGUSR2). SIGTERM
stops it all. DIR holds its pid, the service's log and its state (running or stopped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SIGNALS = {"restart": signal.SIGHUP, "stop": signal.SIGUSR1, "start": signal.SIGUSR2}


def control(directory: Path, action: str) -> None:
    state = directory / "state"
    state.unlink(missing_ok=True)
    os.kill(int((directory / "pid").read_text()), SIGNALS[action])
    deadline = time.monotonic() + 30
    while not state.exists() and time.monotonic() < deadline:  # it says when it has acted
        time.sleep(0.05)


def run(root: str, config: str, directory: Path) -> None:
    child: subprocess.Popen | None = None
    wanted = ["run"]

    def start() -> subprocess.Popen:
        with open(directory / "service.log", "ab") as log:
            return subprocess.Popen([f"{root}/bin/edgellm", "serve", "--config", config], stdout=log,
                                    stderr=subprocess.STDOUT)

    def stop_child() -> None:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    signal.signal(signal.SIGHUP, lambda *_: wanted.append("restart"))
    signal.signal(signal.SIGUSR1, lambda *_: wanted.append("stop"))
    signal.signal(signal.SIGUSR2, lambda *_: wanted.append("run"))
    signal.signal(signal.SIGTERM, lambda *_: wanted.append("exit"))
    (directory / "pid").write_text(str(os.getpid()))
    running = True
    deadline = time.monotonic() + 3600  # bounded, whatever happens to the test that started it
    while time.monotonic() < deadline:
        while len(wanted) > 1:
            action = wanted.pop(1)
            if action == "exit":
                stop_child()
                return
            if action in ("restart", "stop"):
                stop_child()
                child = None
            running = action != "stop"
            (directory / "state").write_text("running" if running else "stopped")
        if running and (child is None or child.poll() is not None):
            if child is not None:
                time.sleep(0.5)  # RestartSec
            child = start()
        time.sleep(0.05)
    stop_child()


if __name__ == "__main__":
    if sys.argv[1] == "control":
        control(Path(sys.argv[2]), sys.argv[3])
    else:
        run(sys.argv[2], sys.argv[3], Path(sys.argv[4]))

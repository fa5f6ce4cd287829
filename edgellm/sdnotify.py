"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING as datagrams to $NOTIFY_SOCKET.

A few lines instead of a dependency: the protocol is one `KEY=value` line per field in
one datagram to a Unix socket (a path, or an abstract name written with a leading '@').
Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from edgellm.engine.service import GenerationService
from edgellm.errors import EdgeError

log = logging.getLogger("edgellm")
_STATUS_EVERY = 5.0  # seconds between STATUS updates when there is no watchdog (or a slow one)


class Notifier:
    """The service's line to systemd (Type=notify); silent when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            # Non-blocking: a full queue on systemd's side must never stall the event loop.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.watchdog_interval = _watchdog_interval(environ)
        self._status = ""
        self._failing = False  # warn once per run of failures, not on every ping

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """One datagram; a lost one is logged, never raised (systemd may be re-executing itself)."""
        if self._sock is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as e:
            if not self._failing:
                log.warning("cannot notify systemd at %s: %s", self._address.replace("\0", "@"), e.strerror or e)
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)
        self._status = status

    def status(self, status: str) -> None:
        """STATUS (what `systemctl status` shows), sent when it changes (again if the send failed)."""
        if status != self._status and self.send(STATUS=status):
            self._status = status

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of WatchdogSec, as systemd advises; None when there is no watchdog
    (or it watches another process: WATCHDOG_PID names the one it means)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6


async def supervise(notifier: Notifier, service: GenerationService, where: str) -> None:
    """READY once the start-up loads have ended (loaded or failed: /health tells which), then
    WATCHDOG while the event loop turns and no model is broken, and STATUS when it changes.

    A model whose runner stopped is loaded afresh by the service; one that cannot be brought
    back (broken) ends the pings, and systemd restarts the service (Restart=on-failure).
    """
    await service.started()
    try:
        service.health()
        problem = ""
    except EdgeError as e:
        problem = f"; {e}"
    notifier.ready(f"serving on {where}: {service.summary()}{problem}")
    interval = min(notifier.watchdog_interval or _STATUS_EVERY, _STATUS_EVERY)
    reported = False
    while True:
        broken = service.broken()
        if broken:
            if not reported:
                log.error("model %s cannot be brought back: %s", ", ".join(broken),
                          "stopping the watchdog so systemd restarts the service" if notifier.watchdog_interval
                          else "restart the service")
                reported = True
            notifier.status(f"model {', '.join(broken)} stopped working: waiting for a restart")
        else:
            reported = False
            notifier.watchdog()
            notifier.status(f"serving on {where}: {service.summary()}")
        await asyncio.sleep(interval)

"""LAN discovery by mDNS/DNS-SD: the service announces itself, `edgellm discover` finds boxes.

The announcement is `_edgellm._tcp.local.` (and `_http._tcp.local.` for the
status page, for generic browsers) with TXT records a client can act on:

    version   edgellm's version
    api       the API base path (/v1)
    auth      "required" or "none" (never a key)
    id        a stable device id (STATE_DIR/device-id)
    models    installed model ids, comma-separated, cut to fit one packet
    more      how many ids did not fit (absent when none)
    rev       changes whenever the installed models change
    tls       "1" when the API speaks TLS only (https), "0" for plain HTTP
    fp        the fingerprint of the certificate it presents (tls.fingerprint: sha256//BASE64)
    fpn       the next one, while a rotation waits (absent otherwise)
    ollama    the port of Ollama's API (/api): the API's own, or [ollama] port when it is set

zeroconf sends its multicast only from the chosen interfaces' addresses: by
default every non-loopback interface when the API listens beyond loopback, and
none when it listens on loopback only (a workstation's `make run`). (Its
listening socket is bound to port 5353 on all addresses, as mDNS requires.)
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edgellm import __version__
from edgellm.files import write_atomic

if TYPE_CHECKING:
    import ssl

    import httpx

log = logging.getLogger("edgellm.discovery")

SERVICE = "_edgellm._tcp.local."
HTTP_SERVICE = "_http._tcp.local."
TXT_BUDGET = 400  # bytes of TXT data: with the names and addresses it stays well inside one packet
WATCH_INTERVAL = 2.0  # seconds between looks at the interfaces' addresses and the models


def device_id(state_dir: str | Path) -> str:
    """A stable id for this box, made once and kept in the state dir (written atomically)."""
    path = Path(state_dir) / "device-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, uuid.uuid4().hex + "\n")
    return path.read_text().strip()


def interface_addresses(names: list[str], host: str) -> dict[str, list[str]]:
    """IPv4 addresses to announce on, by interface: the named ones, or (none named) every
    non-loopback interface when `host` is a wildcard, the one holding `host` otherwise, and
    nothing when `host` is loopback."""
    found = {name: [a.address for a in addrs if a.family == socket.AF_INET]
             for name, addrs in psutil.net_if_addrs().items()}
    if names:
        return {n: found.get(n, []) for n in names}
    ip = ipaddress.ip_address(host) if _is_ip(host) else None
    if ip is not None and ip.is_loopback or host == "localhost":
        return {}
    chosen = {}
    for name, addresses in found.items():
        addresses = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
        if addresses and (ip is None or ip.is_unspecified or host in addresses):
            chosen[name] = addresses
    return chosen


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def txt_records(*, models: list[str], key_required: bool, device: str, ollama: int,
                fingerprint: str = "", next_fingerprint: str = "") -> dict[str, str]:
    records = {"version": __version__, "api": "/v1", "auth": "required" if key_required else "none",
               "id": device, "tls": "1" if fingerprint else "0", "ollama": str(ollama),
               "rev": hashlib.sha256("\n".join(sorted(models)).encode()).hexdigest()[:8]}
    if fingerprint:
        records["fp"] = fingerprint
    if next_fingerprint:
        records["fpn"] = next_fingerprint
    used = sum(len(k) + len(v.encode()) + 2 for k, v in records.items())
    listed: list[str] = []
    for model in models:
        size = len(",".join([*listed, model]).encode())  # TXT strings are bytes: 255 at most each
        if used + size + len("models=") + len("more=999") + 2 > TXT_BUDGET or size > 240:
            break
        listed.append(model)
    records["models"] = ",".join(listed)
    if len(listed) < len(models):
        records["more"] = str(len(models) - len(listed))
    return records


class Announcer:
    """Keeps the box announced while the service runs: TXT updated when the models change,
    re-announced when the addresses change, goodbye packets at shutdown."""

    def __init__(self, *, name: str, port: int, interfaces: list[str], host: str, key_required: bool,
                 device: str, models: Callable[[], list[str]], ollama_port: int = 0,
                 fingerprints: Callable[[], tuple[str, str]] | None = None) -> None:
        """`fingerprints`: the certificate presented and the next one ("" when none), when TLS is on."""
        self.name = name or socket.gethostname().split(".")[0]
        self.port = port
        self.ollama_port = ollama_port or port
        self.interfaces = interfaces
        self.host = host
        self.key_required = key_required
        self.device = device
        self.models = models
        self.fingerprints = fingerprints
        self._zc: AsyncZeroconf | None = None
        self._infos: list[AsyncServiceInfo] = []
        self._addresses: list[str] = []
        self._txt: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await self._announce()
        except Exception:  # the API serves without discovery rather than not at all
            log.exception("announcing on the LAN failed; retrying when the addresses change")
        self._task = asyncio.create_task(self._watch())

    def _records(self) -> dict[str, str]:
        fingerprint, upcoming = self.fingerprints() if self.fingerprints else ("", "")
        return txt_records(models=self.models(), key_required=self.key_required, device=self.device,
                           ollama=self.ollama_port, fingerprint=fingerprint, next_fingerprint=upcoming)

    async def _announce(self) -> None:
        by_interface = interface_addresses(self.interfaces, self.host)
        addresses = sorted(a for values in by_interface.values() for a in values)
        self._addresses = []
        if not addresses:
            log.info("not announcing on the LAN (%s)", "no IPv4 address on " + ", ".join(self.interfaces)
                     if self.interfaces else "the API listens on loopback only")
            return
        self._txt = self._records()
        self._zc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        host = f"{self.name.replace(' ', '-')}.local."
        packed = [socket.inet_aton(a) for a in addresses]
        self._infos = [
            AsyncServiceInfo(SERVICE, f"{self.name}.{SERVICE}", port=self.port, properties=self._txt,
                             server=host, addresses=packed),
            AsyncServiceInfo(HTTP_SERVICE, f"{self.name}.{HTTP_SERVICE}", port=self.port,
                             properties={"path": "/health"}, server=host, addresses=packed),
        ]
        for info in self._infos:
            await self._zc.async_register_service(info, allow_name_change=True)
        final = self._infos[0].name.removesuffix("." + SERVICE)
        if final != self.name:
            # Another box has the name ("edge box-2" was given): its host name is taken too, and two
            # boxes answering for one host name would mix their addresses. Take the new one for both.
            await self._zc.async_unregister_all_services()
            host = f"{final.replace(' ', '-')}.local."
            self._infos = [AsyncServiceInfo(i.type, i.name, port=i.port, properties=i.properties, server=host,
                                            addresses=packed) for i in self._infos]
            for info in self._infos:
                await self._zc.async_register_service(info, allow_name_change=True)
        self._addresses = addresses  # only now: a failure above is retried by the watch
        log.info("announced as %r (%s) on %s", final, SERVICE, ", ".join(sorted(by_interface)))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                addresses = sorted(a for v in interface_addresses(self.interfaces, self.host).values() for a in v)
                if addresses != self._addresses:
                    log.info("addresses changed (%s -> %s): announcing again", self._addresses, addresses)
                    await self._withdraw()
                    await self._announce()
                elif self._zc is not None:
                    txt = self._records()
                    if txt != self._txt:
                        self._txt = txt
                        old = self._infos[0]
                        self._infos[0] = AsyncServiceInfo(SERVICE, old.name, port=self.port, properties=txt,
                                                          server=old.server, addresses=old.addresses)
                        await self._zc.async_update_service(self._infos[0])
                        log.info("TXT records updated (models or certificate changed)")
            except Exception:
                log.exception("keeping the announcement up to date failed")

    async def _withdraw(self) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_all_services()  # goodbye packets: browsers drop the box now
            await self._zc.async_close()
            self._zc = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # no re-announce half done
        await self._withdraw()


@dataclass
class Box:
    """An edgellm service found on the LAN."""

    name: str
    addresses: list[str]
    port: int
    api: str
    models: list[str]
    key_required: bool
    device: str
    version: str
    more_models: int = 0
    ollama_port: int = 0  # where Ollama's API (/api) answers; 0: an older box that does not say
    tls: bool = False
    fingerprint: str = ""  # announced: what it says it presents (anyone on the LAN can announce)
    next_fingerprint: str = ""
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.addresses[0] if self.addresses else "localhost"

    @property
    def base_url(self) -> str:
        """Ready for the openai SDK: OpenAI(base_url=box.base_url, api_key=...)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.api}"


def _box(info: AsyncServiceInfo) -> Box:
    txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
    models = [m for m in txt.get("models", "").split(",") if m]
    return Box(name=info.name.removesuffix("." + SERVICE), addresses=info.parsed_addresses(IPVersion.V4Only),
               port=info.port or 0, api=txt.get("api", "/v1"), models=models,
               key_required=txt.get("auth") == "required", device=txt.get("id", ""),
               version=txt.get("version", ""), more_models=int(txt.get("more", "0") or 0),
               ollama_port=int(txt.get("ollama", "0") or 0), tls=txt.get("tls") == "1",
               fingerprint=txt.get("fp", ""), next_fingerprint=txt.get("fpn", ""), txt=txt)


async def discover(timeout: float = 3.0, interfaces: list[str] | None = None) -> list[Box]:
    """The boxes that answer within `timeout` seconds, resolved."""
    zc = AsyncZeroconf(interfaces=interfaces or _all_ipv4(), ip_version=IPVersion.V4Only)
    names: set[str] = set()

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE, handlers=[changed])
    try:
        await asyncio.sleep(timeout)
        boxes = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE, name)
            if await info.async_request(zc.zeroconf, 1000):
                try:
                    boxes.append(_box(info))
                except (ValueError, TypeError) as e:  # somebody's malformed TXT must not hide the others
                    log.warning("ignoring %s: %s", name, e)
        return boxes
    finally:
        await browser.async_cancel()
        await zc.async_close()


def _all_ipv4() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET]


@dataclass
class Found:
    """A box to talk to: its base_url and how to verify it (the pinned certificate, when it has TLS)."""

    base_url: str
    verify: ssl.SSLContext | bool
    box: Box

    def http_client(self, **options: Any) -> httpx.Client:
        """For the openai SDK: OpenAI(base_url=found.base_url, api_key=KEY, http_client=found.http_client())."""
        import httpx

        return httpx.Client(verify=self.verify, **options)

    def async_http_client(self, **options: Any) -> httpx.AsyncClient:
        """For AsyncOpenAI, the ollama client (ollama.AsyncClient(host=..., verify=found.verify)) and the like."""
        import httpx

        return httpx.AsyncClient(verify=self.verify, **options)


def find_base_url(model: str | None = None, timeout: float = 3.0, fingerprint: str | None = None) -> Found:
    """An edgellm box on the LAN (one serving `model`, if given), ready for the openai SDK:

        from openai import OpenAI
        from edgellm.discovery import find_base_url
        box = find_base_url(fingerprint="sha256//...")  # from the box's key note
        client = OpenAI(base_url=box.base_url, api_key="...", http_client=box.http_client())

    With `fingerprint`, only a box presenting that certificate is taken: another that announces
    the same name (or the same fingerprint) is refused, with what it presents. Without it, a
    TLS box is pinned to the fingerprint it announces, which is only as good as the LAN."""
    from edgellm.tls import TLSError, pinned_context

    boxes = [b for b in asyncio.run(discover(timeout)) if model is None or model in b.models]
    refused = []
    for box in boxes:
        if not box.tls:
            if fingerprint:
                refused.append(f"{box.name} at {box.host}:{box.port} speaks plain HTTP, so it has no certificate "
                               f"{fingerprint}")
                continue
            return Found(box.base_url, True, box)
        # Every address it announces: two boxes that share a name share its address records too.
        for host in box.addresses or [box.host]:
            try:
                context = pinned_context(host, box.port, fingerprint or box.fingerprint)
            except TLSError as e:
                refused.append(f"{box.name}: {e}")
                continue
            return Found(f"https://{host}:{box.port}{box.api}", context, box)
    if refused:
        raise PinError("; ".join(refused))
    wanted = f" serving {model}" if model else ""
    raise LookupError(f"no edgellm box{wanted} answered on the LAN within {timeout:g} s")


class PinError(LookupError):
    """Boxes answered, but none presents the certificate asked for."""

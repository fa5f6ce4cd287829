"""The `edgellm` command. Errors are one line on stderr and a non-zero exit, never a traceback.

Imported at the top: what parsing the arguments and reporting a config error takes. Each
command imports the rest itself (asyncio, logging, the store, the server), so `--version`
and a mistyped command answer in well under 0.15 s (tools/bench/startup.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from edgellm import __version__
from edgellm.config import Config, ConfigError, TLSFiles, credential, is_loopback, load, read_keys
from edgellm.errors import EdgeError
from edgellm.modelfile import gguf
from edgellm.progress import Bar
from edgellm.units import parse_duration

if TYPE_CHECKING:
    import asyncio
    import logging

    from edgellm import tls
    from edgellm.discovery import Box
    from edgellm.tls import Serving

APPLIANCE_CONFIG = "/etc/edgellm/edgellm.toml"
APPLIANCE_TLS = "/etc/edgellm/tls"  # root's; the service gets it as credentials (systemd/edgellm.service)
EXIT_USAGE = 2
EXIT_RUNTIME = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellm", description="An OpenAI-compatible LLM server for small boards.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (every key has a default)")
    serve.add_argument("--model", metavar="PATH", help="GGUF file to serve (overrides [model] path)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default 8080; 0 picks a free one)")
    serve.add_argument("--state-dir", metavar="DIR", help="where edgellm keeps its state (default ./.edgellm)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow listening beyond loopback without API keys")
    serve.add_argument("--hardware-root", metavar="DIR", default="/", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    doctor = commands.add_parser("doctor", help="what this box has, the backend plan, and what to fix")
    doctor.add_argument("--config", metavar="FILE", help="TOML config file (for its [engine] choices)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--hardware-root", metavar="DIR", default="/",
                        help="read /proc, /sys, /dev and /etc under DIR (a copy of another box's)")
    doctor.set_defaults(func=_doctor)

    models = commands.add_parser("models", help="the models installed in the state dir")
    actions = models.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, helptext in (("list", "list installed models"), ("add", "install a GGUF file (copy or hard link)"),
                           ("remove", "uninstall a model"), ("show", "everything known about a model")):
        action = actions.add_parser(name, help=helptext)
        action.add_argument("--config", metavar="FILE", help="TOML config file (for its [server] state_dir)")
        action.add_argument("--state-dir", metavar="DIR", help="where edgellm keeps its state (default ./.edgellm)")
        if name == "add":
            action.add_argument("path", metavar="PATH", help="a .gguf file (the first part of a split model)")
            action.add_argument("--alias", metavar="NAME", help="another name clients may use")
        elif name in ("remove", "show"):
            action.add_argument("model", metavar="ID", help="the model's id or alias")
        if name in ("list", "show"):
            action.add_argument("--json", action="store_true", help="machine-readable output")
        action.set_defaults(func=_models)

    discover = commands.add_parser("discover", help="find edgellm boxes on the LAN (mDNS/DNS-SD)")
    discover.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to listen (default 3)")
    discover.add_argument("--json", action="store_true", help="machine-readable output")
    discover.add_argument("--fingerprint", metavar="FP",
                          help="the TLS fingerprint from the box's key note: say which boxes present it")
    discover.set_defaults(func=_discover)

    tls = commands.add_parser("tls", help="the box's own TLS certificate")
    tls_steps = tls.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, helptext in (("show", "the fingerprint clients pin, and a rotation that waits"),
                           ("rotate", "make a new certificate; the old one is presented for the grace period")):
        step = tls_steps.add_parser(name, help=helptext)
        step.add_argument("--dir", metavar="DIR", help="the certificate directory (default: /etc/edgellm/tls on "
                          "the appliance, else <state dir>/tls)")
        step.add_argument("--config", metavar="FILE", help="TOML config file (for its [server] state_dir)")
        step.add_argument("--state-dir", metavar="DIR", help="where edgellm keeps its state (default ./.edgellm)")
        if name == "rotate":
            step.add_argument("--grace", metavar="TIME", default="7d",
                              help="how long clients pinned to the old certificate keep working (default 7d; "
                              "0 after a key leaked)")
            step.add_argument("--no-restart", action="store_true",
                              help="on the appliance, do not restart edgellm.service to publish it")
        step.set_defaults(func=_tls)

    keygen = commands.add_parser("keygen", help="make a key pair for signing bundles (minisign format)")
    keygen.add_argument("-o", "--output", metavar="PREFIX", default="edgellm",
                        help="write PREFIX.key (secret, mode 600) and PREFIX.pub (default: ./edgellm)")
    keygen.set_defaults(func=_keygen)

    bundle = commands.add_parser("bundle", help="signed model bundles for air-gapped sites")
    steps = bundle.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = steps.add_parser("create", help="bundle installed models (ids or aliases) or GGUF files")
    create.add_argument("models", metavar="MODEL", nargs="+")
    create.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="a directory to create (for USB sticks), or a .tar file (for uploads)")
    create.add_argument("--key", metavar="KEY", help="secret key to sign with (edgellm keygen, or minisign -G -W)")
    create.add_argument("--license", metavar="TEXT", default="", help="the models' license, recorded in the manifest")
    for name, helptext in (("verify", "check a bundle's signature and every file's SHA-256"),
                           ("import", "install the models of a bundle, or of every bundle in a directory")):
        step = steps.add_parser(name, help=helptext)
        step.add_argument("path", metavar="PATH")
        if name == "import":
            step.add_argument("--allow-downgrade", action="store_true",
                              help="let a bundle replace models installed from newer bundles")
    for step in (create, *[steps.choices[n] for n in ("verify", "import")]):
        step.add_argument("--config", metavar="FILE", help="TOML config file ([server] state_dir, [bundles])")
        step.add_argument("--state-dir", metavar="DIR", help="where edgellm keeps its state (default ./.edgellm)")
        step.set_defaults(func=_bundle)

    update = commands.add_parser("update", help="signed software updates for air-gapped sites")
    update_steps = update.add_subparsers(dest="action", required=True, parser_class=_Parser)
    make = update_steps.add_parser("create", help="make an update bundle from a directory of wheels")
    make.add_argument("wheels", metavar="WHEEL_DIR",
                      help="the edgellm wheel and every wheel it needs, for the board's Python and CPU")
    make.add_argument("-o", "--output", metavar="OUT", required=True,
                      help="a directory to create (for USB sticks), or a .tar file (for uploads)")
    make.add_argument("--key", metavar="KEY", required=True,
                      help="secret key to sign with; boxes trust its public key as NAME.update.pub")
    make.add_argument("--min-from", metavar="VERSION", default="0.1.0",
                      help="the oldest edgellm version this update may replace (default 0.1.0)")
    for name, helptext in (("verify", "check an update's signature, versions and every file's SHA-256"),
                           ("apply", "install an update beside the running version and switch to it (root)")):
        step = update_steps.add_parser(name, help=helptext)
        step.add_argument("path", metavar="PATH", nargs="?" if name == "apply" else None)
        step.add_argument("--allow-downgrade", action="store_true", help="accept a version older than the running one")
        if name == "apply":
            step.add_argument("--pending", action="store_true",
                              help="apply the update staged by an upload or a USB stick (edgellm-update.service)")
    resume = update_steps.add_parser("resume", help="settle an update cut off before it was confirmed (at boot)")
    status = update_steps.add_parser("status", help="the running version and the last update's outcome")
    for step in (make, *[update_steps.choices[n] for n in ("verify", "apply")], resume, status):
        step.add_argument("--config", metavar="FILE",
                          help=f"TOML config file (default: the service's, {APPLIANCE_CONFIG} on the appliance)")
        step.add_argument("--state-dir", metavar="DIR", help="where edgellm keeps its state")
        step.set_defaults(func=_update)

    firstboot = commands.add_parser("firstboot", help="make a freshly flashed appliance card this box "
                                    "(run once by edgellm-firstboot.service)")
    firstboot.add_argument("--boot", metavar="DIR", default="/boot/firmware",
                           help="the FAT boot partition (default /boot/firmware)")
    firstboot.add_argument("--root", metavar="DIR", default="/",
                           help="the system to set up (default /: also sets the host name and grows the partition)")
    firstboot.add_argument("--console", metavar="FILE",
                           help="where the keys are shown (default: every active console)")
    firstboot.set_defaults(func=_firstboot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"edgellm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except EdgeError as e:
        print(f"edgellm: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as e:  # a file the command cannot reach: permissions, a stick pulled out
        print(f"edgellm: {e.filename}: {e.strerror}" if e.filename else f"edgellm: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


def _give_back_freed_memory() -> None:
    """glibc raises its mmap threshold to the largest block a process frees (up to 32 MiB), and
    blocks under it are kept in the heap after free: then every model load and unload (its
    buffers, a bundle's hashing) leaves RSS higher. A fixed threshold keeps large blocks in mmap,
    handed back when freed (a 90 s soak with bundle installs: +87 MiB without, +10 MiB with)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: glibc's default, fixed
    except (OSError, AttributeError):  # not glibc
        pass


def _serve(args: argparse.Namespace) -> int:
    # Without --config, the one systemd hands over (LoadCredential=edgellm.toml: root's file).
    config = load(args.config or credential("edgellm.toml") or None).with_overrides(
        server={"host": args.host, "port": args.port, "state_dir": args.state_dir},
        model={"path": args.model},
    )
    _check_model_file(config, from_flag=args.model is not None)
    keys = read_keys(config.server.api_keys, config.server.api_key_file or credential("api-keys"),
                     f"{config.source}: [server] api_key_file")
    admin_keys = read_keys(config.server.admin_keys, config.server.admin_key_file or credential("admin-keys"),
                           f"{config.source}: [server] admin_key_file")
    host, port = config.server.host, config.server.port
    if not is_loopback(host) and not keys and not args.insecure_no_auth:
        raise ConfigError(f"refusing to listen on {host} without API keys: set [server] api_keys or "
                          "api_key_file in the config, or pass --insecure-no-auth")
    try:
        Path(config.server.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state dir {config.server.state_dir}: cannot create it: {e.strerror}") from None

    import logging

    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    certificate = _certificate(config)
    scheme = "https" if certificate else "http"
    sockets = []
    for listen_port in (port, *([config.ollama.port] if config.ollama.port else [])):
        try:
            sockets.append(_bind(host, listen_port))
        except OSError as e:
            print(f"edgellm: cannot listen on {host}:{listen_port}: {e.strerror or e}", file=sys.stderr)
            return EXIT_RUNTIME
    sock = sockets[0]

    log = logging.getLogger("edgellm")
    if not is_loopback(host) and not keys:
        log.warning("no API keys on %s (--insecure-no-auth): anyone on the network can use this service", host)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("edgellm %s listening on %s://%s:%d (API keys: %s)", __version__, scheme, shown, bound_port,
             "required" if keys else "not required")
    if certificate:
        log.info("TLS only, certificate %s (pin it: README, 'The appliance')", certificate.presented.fingerprint)
    ollama_port = sockets[1].getsockname()[1] if len(sockets) > 1 else 0
    plain = sockets[1] if ollama_port and certificate and not config.ollama.tls else None
    if ollama_port:
        log.info("and on %s://%s:%d for Ollama's clients ([ollama] port%s)", "http" if plain else scheme, shown,
                 ollama_port, "; tls = false: plain HTTP" if plain else "")

    import asyncio  # only now: the socket listens (connections queue) while the server is imported and built

    import uvicorn

    from edgellm.app import create_app
    from edgellm.sdnotify import Notifier, supervise
    from edgellm.serving.connections import Limits, bounded

    _give_back_freed_memory()
    app = create_app(config, keys, admin_keys, hardware_root=args.hardware_root, port=bound_port,
                     ollama_port=ollama_port, certificate=certificate)

    notifier = Notifier()
    where = f"{scheme}://{shown}:{bound_port}"
    s = config.server

    class Server(uvicorn.Server):
        supervising: asyncio.Task | None = None
        watching: asyncio.Task | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            loop = asyncio.get_running_loop()
            if certificate:
                loop.create_server = functools.partial(  # type: ignore[method-assign]
                    _create_server, loop.create_server, plain=plain, handshake=seconds(s.header_timeout))
            try:
                await super().startup(sockets)
            finally:
                if certificate:
                    del loop.create_server
            if not self.should_exit:  # READY and the watchdog, once start-up loads end
                self.supervising = asyncio.create_task(supervise(notifier, app.state.service, where))
                if certificate and self.config.ssl is not None:
                    self.watching = asyncio.create_task(certificate.watch(self.config.ssl))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            notifier.stopping()
            for task in (self.supervising, self.watching):
                if task is not None:
                    task.cancel()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # End running generations at once (from the loop, not inside the signal handler),
            # so open streams finish with an error event instead of being cut off later.
            asyncio.get_event_loop().call_soon_threadsafe(app.state.pool.interrupt)

    limits = Limits(max_header_bytes=s.max_header_bytes, max_headers=s.max_headers, max_target_bytes=s.max_request_line,
                    header_timeout=seconds(s.header_timeout), body_timeout=seconds(s.body_timeout),
                    max_connections=_connection_cap(s.max_connections, log))
    presented = certificate.presented if certificate else None
    # proxy_headers off: uvicorn would take the client's address from X-Forwarded-For on loopback
    # connections, and [server] keyless_addresses trusts the address.
    server = Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, server_header=False,
                                   proxy_headers=False,
                                   http=bounded(limits), timeout_keep_alive=math.ceil(seconds(s.keep_alive_timeout)),
                                   ssl_certfile=str(presented.file) if presented else None,
                                   ssl_keyfile=str(presented.key) if presented and presented.key else None))
    server.run(sockets=sockets)
    return 0


DESCRIPTOR_RESERVE = 64  # descriptors kept for model files, the mDNS sockets, the journal, state files


def _connection_cap(wanted: int, log: logging.Logger) -> int:
    """[server] max_connections, lowered to what the descriptor limit leaves: past the cap a client
    gets a 503, while past the limit accept() would fail (EMFILE) for everyone, silently."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = max(soft - DESCRIPTOR_RESERVE, 1) if soft != resource.RLIM_INFINITY else wanted
    if wanted > room:
        log.warning("[server] max_connections %d is above what the descriptor limit (%d) allows: lowered to %d",
                    wanted, soft, room)
        return room
    return wanted


def _create_server(create_server: Callable[..., Any], factory: Callable[[], asyncio.Protocol], *,
                   sock: socket.socket, ssl: object, plain: socket.socket | None, handshake: float,
                   **options: Any) -> Any:
    """uvicorn's call to loop.create_server for each listening socket, changed for TLS: a
    handshake must end within the header timeout (asyncio waits 60 s by default, and the
    connection's own limits start after it), and the socket of [ollama] tls = false speaks plain
    HTTP. uvicorn has no option for either."""
    if sock is plain:
        return create_server(factory, sock=sock, ssl=None, **options)
    return create_server(factory, sock=sock, ssl=ssl, ssl_handshake_timeout=handshake, **options)


def _certificate(config: Config) -> Serving | None:
    """What [server] tls says to present: None for plain HTTP (off, or auto on loopback)."""
    setting = config.server.tls
    if setting == "off" or (setting == "auto" and is_loopback(config.server.host)):
        return None
    from edgellm import tls

    if isinstance(setting, TLSFiles):
        return tls.Serving(cert=setting.cert, key=setting.key)
    if credential("tls_device.pem"):  # the appliance's, handed over by systemd (LoadCredential=tls:...)
        return tls.Serving(tls.Directory(os.environ["CREDENTIALS_DIRECTORY"], prefix="tls_"))
    directory = tls.Directory(Path(config.server.state_dir) / "tls")
    if not directory.exists():
        fingerprint = directory.make(tls.box_names())
        print(f"edgellm: made this box's TLS certificate in {directory.path}: {fingerprint}", file=sys.stderr)
    return tls.Serving(directory)


def _tls(args: argparse.Namespace) -> int:
    from edgellm import tls

    if args.dir:
        directory = tls.Directory(args.dir)
    elif Path(APPLIANCE_TLS).is_dir():
        directory = tls.Directory(APPLIANCE_TLS)
    else:
        config = load(args.config).with_overrides(server={"state_dir": args.state_dir})
        directory = tls.Directory(Path(config.server.state_dir) / "tls")
    if args.action == "show":
        if not directory.exists():
            raise ConfigError(f"{directory.path}: no certificate here (edgellm tls rotate makes one)")
        _show_certificate(directory.presented())
        return 0
    try:
        grace = parse_duration(args.grace)
    except ValueError:
        grace = None
    if grace is None or grace < 0:
        raise ConfigError(f"--grace: a time such as 7d, 12h or 0, got {args.grace!r}")
    existed = directory.exists()
    presented = directory.rotate(tls.box_names(), grace)
    if not existed:
        print(f"made the first certificate in {directory.path}")
    _show_certificate(presented)
    if directory.path == Path(APPLIANCE_TLS) and not args.no_restart and Path("/run/systemd/system").is_dir():
        import subprocess

        # The service reads its certificate as a credential: a copy made when it starts.
        subprocess.run(["systemctl", "try-restart", "edgellm.service"], check=False)
        print("edgellm.service restarted to publish it (the models load again on their first request)")
    return 0


def _show_certificate(presented: tls.Presented) -> None:
    print(f"fingerprint: {presented.fingerprint}")
    if presented.next_fingerprint:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(presented.next_after))
        print(f"next:        {presented.next_fingerprint} (presented from {when})")


def _firstboot(args: argparse.Namespace) -> int:
    from edgellm import firstboot

    layout = firstboot.Layout(root=Path(args.root), boot=Path(args.boot),
                              console=Path(args.console) if args.console else None)
    if not layout.boot.is_dir():
        raise ConfigError(f"boot partition {layout.boot}: not a directory (is it mounted?)")
    try:
        for line in firstboot.run(layout):
            print(f"edgellm-firstboot: {line}")
    except (firstboot.FirstBootError, OSError) as e:
        print(f"edgellm-firstboot: {e} (it runs again at the next boot)", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from edgellm.hardware.report import render, report

    if not Path(args.hardware_root).is_dir():
        raise ConfigError(f"--hardware-root: no such directory: {args.hardware_root}")
    data = report(args.hardware_root, load(args.config).engine)
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0


def _discover(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import asdict

    from edgellm.discovery import discover

    if not 0 < args.timeout <= 600:
        raise ConfigError("--timeout: expected seconds from 0 to 600")
    boxes = asyncio.run(discover(args.timeout))
    presented = {id(b): _presented(b) for b in boxes}
    if args.json:
        print(json.dumps([{**asdict(b), "base_url": b.base_url, "presented_fingerprint": presented[id(b)],
                           "certificate": _verdict(b, presented[id(b)], args.fingerprint)} for b in boxes],
                         indent=2))
    elif boxes:
        _table(["NAME", "URL", "ADDRESSES", "KEY", "MODELS", "CERTIFICATE"],
               [[b.name, b.base_url, ",".join(b.addresses), "required" if b.key_required else "no",
                 ",".join(b.models) + (f" (+{b.more_models})" if b.more_models else "") or "-",
                 _verdict(b, presented[id(b)], args.fingerprint)] for b in boxes])
    else:
        print(f"no edgellm boxes answered within {args.timeout:g} s", file=sys.stderr)
    if args.fingerprint and not any(presented[id(b)] == args.fingerprint for b in boxes):
        print(f"edgellm: no box presents {args.fingerprint}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _presented(box: Box) -> str:
    """The fingerprint of the certificate a TLS box presents ("" without TLS), or why none came."""
    if not box.tls:
        return ""
    from edgellm import tls

    try:
        return tls.fingerprint(tls.fetch_certificate(box.host, box.port))
    except tls.TLSError as e:
        return f"error: {e}"


def _verdict(box: Box, presented: str, pin: str | None) -> str:
    if not box.tls:
        return "none (plain HTTP)"
    if presented.startswith("error"):
        return presented
    if pin:
        return f"{presented} (pinned)" if presented == pin else f"{presented} (NOT {pin}: refuse it)"
    if presented != box.fingerprint:
        return f"{presented} (NOT the announced {box.fingerprint}: refuse it)"
    return f"{presented} (as announced: check it against the key note)"


def _keygen(args: argparse.Namespace) -> int:
    from edgellm.bundles import signing

    secret, public = Path(args.output + ".key"), Path(args.output + ".pub")
    for path in (secret, public):
        if path.exists():
            raise ConfigError(f"{path} already exists; not overwriting a key")
    key = signing.generate()
    try:
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ConfigError(f"{secret}: cannot create it: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.text())
    public.write_text(key.public_key().text())
    print(f"key {key.public_key().id}: secret key {secret} (keep it off the boxes), public key {public} "
          "(copy it into each box's trusted keys directory)")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from edgellm.bundles import signing
    from edgellm.bundles.create import create
    from edgellm.bundles.importer import (
        Policy,
        import_bundle,
        signed_by,
        verify,
        verify_files,
    )
    from edgellm.bundles.reader import BundleError, find_bundles, open_source
    from edgellm.store.registry import Registry
    from edgellm.update.apply import running_here, stage
    from edgellm.update.bundle import is_update

    config = load(args.config).with_overrides(server={"state_dir": args.state_dir})
    registry = Registry(config.server.state_dir)
    bar = Bar()
    if args.action == "create":
        key = signing.read_secret_key(args.key) if args.key else None
        manifest = create(args.models, Path(args.output), registry=registry, key=key, license=args.license,
                          progress=bar)
        print(f"created {args.output}: {', '.join(m.id for m in manifest.models)}"
              + (f", signed by key {key.public_key().id}" if key else ", unsigned"))
        return 0
    policy = Policy.from_config(config)
    for warning in policy.skipped:
        print(f"edgellm: warning: {warning}", file=sys.stderr)
    failed = 0
    for path in find_bundles(Path(args.path)):
        source = None
        try:
            source = open_source(path)
            if is_update(source):  # a software update on the stick: staged for edgellm-update.service
                if args.action == "verify":
                    raise BundleError(f"{path}: a software update: check it with `edgellm update verify`")
                running = running_here(config)
                verified = stage(source, config, running=running)
                print(f"staged edgellm {verified.manifest.edgellm_version} from {path}: edgellm-update.service "
                      "installs it and restarts the service" if verified else
                      f"unchanged: {path} is edgellm {running}, which runs here already")
            elif args.action == "verify":
                manifest, key_id = verify(source, policy)
                verify_files(source, manifest, bar)
                print(f"ok {path}: {', '.join(m.id for m in manifest.models)} ({signed_by(key_id)})")
            else:
                outcomes = import_bundle(source, registry, policy, engine=config.engine,
                                         memory_limit=config.memory_limit, progress=bar,
                                         allow_downgrade=args.allow_downgrade)
                for outcome in outcomes:
                    print(f"{outcome.status} {outcome.model} from {path}")
        except (EdgeError, OSError) as e:
            failed += 1
            print(f"edgellm: {e}", file=sys.stderr)
        finally:
            if source is not None:
                source.close()
    return EXIT_RUNTIME if failed else 0


def _update(args: argparse.Namespace) -> int:
    from edgellm.bundles import signing
    from edgellm.bundles.importer import verify_files
    from edgellm.bundles.reader import open_source
    from edgellm.update import UpdateError, apply, bundle
    from edgellm.update.layout import Layout

    default = credential("edgellm.toml") or (APPLIANCE_CONFIG if Path(APPLIANCE_CONFIG).is_file() else None)
    config = load(args.config or default).with_overrides(server={"state_dir": args.state_dir})
    layout = Layout(config.update.root)
    if args.action == "create":
        manifest = bundle.create(Path(args.wheels), Path(args.output), key=signing.read_secret_key(args.key),
                                 min_from=args.min_from, progress=Bar())
        print(f"created {args.output}: edgellm {manifest.edgellm_version} for Python {manifest.python} on "
              f"{manifest.machine}, {len(manifest.wheels)} wheels, updates {manifest.min_from_version} or newer")
        return 0
    if args.action == "status":
        print(json.dumps({"current": layout.current(), "trial": layout.trial(), "last": layout.status()}, indent=2))
        return 0
    if args.action == "resume":
        apply.resume(config)
        return 0
    if args.action == "apply" and args.pending:
        apply.apply_pending(config)
        return 0
    if not args.path:
        raise UpdateError("give the update bundle's PATH, or --pending")
    source = open_source(Path(args.path))
    try:
        if args.action == "verify":
            running = apply.running_here(config)
            trusted, skipped = bundle.keys(config)
            for warning in skipped:
                print(f"edgellm: warning: {warning}", file=sys.stderr)
            verified = bundle.verify(source, trusted, running=running, allow_downgrade=args.allow_downgrade)
            verify_files(source, verified.manifest, Bar())
            print(f"ok {args.path}: edgellm {verified.manifest.edgellm_version} for Python {verified.manifest.python} "
                  f"on {verified.manifest.machine} (key {verified.key_id}); this box runs {running}")
            return 0
        apply.apply(source, config, allow_downgrade=args.allow_downgrade, progress=Bar())
    finally:
        source.close()
    return 0


def _models(args: argparse.Namespace) -> int:
    from edgellm.store.registry import Registry, StoreError

    config = load(args.config).with_overrides(server={"state_dir": args.state_dir})
    registry = Registry(config.server.state_dir)
    if args.action in ("add", "remove"):  # writers clear what interrupted ones left; readers take no lock
        registry.open()
    if args.action == "list":
        entries = registry.entries()
        if args.json:
            print(json.dumps([e.record() for e in entries], indent=2))
        else:
            _table(["ID", "ALIASES", "ARCH", "QUANT", "PARAMS", "CONTEXT", "SIZE"],
                   [[e.id, ",".join(e.aliases) or "-", e.architecture, e.quantization, _count(e.parameters),
                     str(e.context_length), _bytes(e.size)] for e in entries])
    elif args.action == "add":
        added, new = registry.add(args.path, alias=args.alias, progress=_progress(Path(args.path)))
        verb = "installed" if new else "already installed as"
        print(f"{verb} {added.id} ({_bytes(added.size)}, {added.architecture} {added.quantization}, "
              f"sha256 {added.sha256[:12]})")
    elif args.action == "remove":
        print(f"removed {registry.remove(args.model).id}")
    else:
        entry = registry.find(args.model)
        if entry is None:
            raise StoreError(f"no installed model is called {args.model!r}")
        if args.json:
            print(json.dumps({**entry.record(), "paths": [str(p) for p in entry.paths]}, indent=2))
        else:
            for key, value in entry.record().items():
                if key == "files":
                    value = ", ".join(f"{f.name} ({_bytes(f.size)}, sha256 {f.sha256[:12]})" for f in entry.files)
                print(f"{key + ':':16}{value}")
            print(f"{'paths:':16}{', '.join(str(p) for p in entry.paths)}")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def _progress(path: Path) -> Callable[[int], None] | None:
    """A bar on stderr while a large file is hashed and copied; nothing when not a terminal."""
    bar = Bar()
    if not bar.enabled:
        return None
    total = sum(p.stat().st_size for p in gguf.split_parts(path) if p.exists()) or 1
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar("adding", path.name, done, total)

    return advance


def _check_model_file(config: Config, *, from_flag: bool) -> None:
    """A missing or unreadable --model file is a config error, named by where it came from."""
    path = config.model.path
    if not path:
        return
    where = "--model" if from_flag else f"{config.source}: [model] path"
    for part in gguf.split_parts(Path(path)):
        try:
            gguf.read(part)
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file: {part}") from None
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {part}: {e.strerror}") from None
        except gguf.GGUFError as e:
            raise ConfigError(f"{where}: {e}") from None


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # connections queue from now on, while start-up finishes
    except OSError:
        sock.close()
        raise
    return sock


def seconds(duration: str) -> float:
    """A positive duration the config has already checked."""
    value = parse_duration(duration)
    assert value is not None
    return value

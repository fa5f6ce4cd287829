"""The `edgellm` command. Errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

from edgellm import __version__
from edgellm.config import Config, ConfigError, is_loopback, load, read_api_keys

log = logging.getLogger("edgellm")

EXIT_USAGE = 2
EXIT_RUNTIME = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
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
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"edgellm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    config = load(args.config).with_overrides(
        server={"host": args.host, "port": args.port, "state_dir": args.state_dir},
        model={"path": args.model},
    )
    _check_model_file(config, from_flag=args.model is not None)
    keys = read_api_keys(config.server, config.source)
    host, port = config.server.host, config.server.port
    if not is_loopback(host) and not keys and not args.insecure_no_auth:
        raise ConfigError(f"refusing to listen on {host} without API keys: set [server] api_keys or "
                          "api_key_file in the config, or pass --insecure-no-auth")
    try:
        Path(config.server.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state dir {config.server.state_dir}: cannot create it: {e.strerror}") from None

    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        sock = _bind(host, port)
    except OSError as e:
        print(f"edgellm: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_RUNTIME

    import uvicorn  # here, so `edgellm --version` and config errors stay fast

    from edgellm.app import create_app

    if not is_loopback(host) and not keys:
        log.warning("no API keys on %s (--insecure-no-auth): anyone on the network can use this service", host)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("edgellm %s listening on http://%s:%d (API keys: %s)", __version__, shown, bound_port,
             "required" if keys else "not required")
    app = create_app(config, keys)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            # End running generations at once (from the loop, not inside the signal handler),
            # so open streams finish with an error event instead of being cut off later.
            asyncio.get_event_loop().call_soon_threadsafe(app.state.pool.interrupt)

    server = Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, server_header=False))
    server.run(sockets=[sock])
    return 0


def _check_model_file(config: Config, *, from_flag: bool) -> None:
    """A missing or non-GGUF model file is a config error, named by where it came from."""
    path = config.model.path
    where = "--model" if from_flag else f"{config.source}: [model] path"
    if not path:
        raise ConfigError("no model to serve: pass --model PATH or set [model] path in a --config file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file: {path}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ConfigError(f"{where}: {path} is not a GGUF file")


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock

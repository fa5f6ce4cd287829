"""Configuration: one TOML file -> frozen dataclasses.

Every key has a default, so an empty file (or none) is a valid configuration.
Every error names the key and the file, because the operator reading it may be
looking at a serial console on a board with no other way to debug.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.units import parse_duration, parse_size


class ConfigError(EdgeError):
    """A configuration problem, phrased as one line for the operator."""

    code = "config_error"


@dataclass(frozen=True)
class TLSFiles:
    """[server] tls = {cert = "...", key = "..."}: a certificate of the operator's own."""

    cert: str
    key: str = ""  # empty: the key is in the certificate's file


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    api_key_file: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    state_dir: str = ".edgellm"
    admin_keys: tuple[str, ...] = ()
    admin_key_file: str = ""
    # What one connection may ask of the box (serving/connections.py): a small board's defaults.
    max_connections: int = 512  # below the descriptor limit (the unit's LimitNOFILE=1024); one more gets 503
    max_header_bytes: int = 16384  # the request line and headers; more is 431
    max_headers: int = 64  # header lines; more is 431
    max_request_line: int = 8192  # bytes of the request target; more is 414
    header_timeout: str = "10s"  # from connect (or a request's first byte) to the end of its head; then 408
    body_timeout: str = "60s"  # the longest silence in a request body (then it closes); all of a JSON body (408)
    keep_alive_timeout: str = "5s"  # an idle connection between requests is closed after this
    # Host names the box answers to besides its own (serving/policy.py): a DNS name, a proxy's.
    allowed_hosts: tuple[str, ...] = ()
    # Web pages (scheme://host[:port]) whose scripts may call the API from a browser.
    cors_origins: tuple[str, ...] = ()
    # Addresses or networks (192.168.1.20, 10.0.0.0/24) whose clients may use the API without a key,
    # never the admin API: apps that cannot send one (Home Assistant's Ollama integration).
    keyless_addresses: tuple[str, ...] = ()
    # "auto": HTTPS with the box's own certificate (edgellm/tls.py) when the API listens beyond
    # loopback, plain HTTP on loopback; "off": plain HTTP; {cert, key}: HTTPS with these files.
    tls: str | TLSFiles = "auto"


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    id: str = ""
    chat_template: str = ""


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0
    n_gpu_layers: int = -1  # -1: the plan decides (all that fit)
    flash_attn: str = "auto"
    backend: str = "auto"  # auto, cuda, vulkan or cpu
    throttle_threads: bool = False  # halve the threads while the board throttles
    parallel: int = 4
    max_queue: int = 16
    cache_type_k: str = "f16"  # the KV cache's element types: f16, q8_0 or q4_0 (quantized V needs
    cache_type_v: str = "f16"  # flash attention: flash_attn auto turns it on, off refuses)
    prompt_cache_memory: str = "128MiB"  # prompt snapshots kept in RAM (engine/prompt_cache.py); 0: none
    prompt_cache_disk: str = "2GiB"  # and under <state dir>/prompt-cache, across restarts; 0: none
    prompt_cache_shared: bool = False  # true: API keys reuse each other's cached prompts (one user's keys)


@dataclass(frozen=True)
class ModelsConfig:
    max_loaded: int = 2
    memory_budget: str = ""  # empty: the RAM psutil says is available, minus memory_reserve
    memory_reserve: str = "256MiB"
    keep_alive: str = "5m"
    # The keep_alive a request may ask for (an admin key's may be anything): at least min_keep_alive,
    # so that no client can make a model unload after each request and reload for the next one; at
    # most max_keep_alive (-1: until evicted to make room, as Ollama's -1).
    min_keep_alive: str = "1m"
    max_keep_alive: str = "-1"
    load_timeout: str = "120s"
    pinned: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = True
    name: str = ""  # the DNS-SD instance name; empty: the host name
    # Interfaces to announce on; empty: every non-loopback one when [server] host is not
    # loopback, none when it is.
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class RelayConfig:
    url: str = ""  # the upstream's base URL, e.g. http://vllm.dc:8000/v1; empty: no relay
    api_key_file: str = ""
    api_key_env: str = ""  # the name of an environment variable holding the key
    connect_timeout: str = "3s"
    first_byte_timeout: str = "60s"
    idle_timeout: str = "60s"
    models: tuple[str, ...] = ()  # the upstream's models; empty: asked from its /v1/models
    refresh: str = "60s"  # how often to ask
    missing: bool = True  # a model not installed here goes upstream
    overflow: bool = False  # so does a request whose estimated local wait exceeds ttft_budget
    ttft_budget: str = "2s"
    fallback: bool = True  # and one whose local attempt fails before its first byte
    offline: bool = False  # never relay, whatever the above say
    breaker_failures: int = 3  # consecutive failures that open the circuit
    breaker_cooldown: str = "10s"  # before a half-open probe of /health
    load_metrics: bool = False  # read vLLM's /metrics: no overflow to a saturated upstream
    max_waiting: int = 8  # upstream requests waiting (vllm:num_requests_waiting) that count as saturated


@dataclass(frozen=True)
class BundlesConfig:
    policy: str = "require-signature"  # or allow-unsigned (development)
    trusted_keys: str = ""  # a directory of minisign .pub files; empty: <state dir>/trusted-keys


@dataclass(frozen=True)
class OllamaConfig:
    """Ollama's native API (/api), served on the API's port always, and on Ollama's own if set."""

    port: int = 0  # a second listener for clients set up for Ollama (11434); 0: none
    pull_dir: str = ""  # bundles /api/pull installs from (a mounted stick); empty: pull finds nothing
    allow_unsigned_create: bool = False  # /api/create from uploaded blobs under policy require-signature
    # false: that second port speaks plain HTTP though [server] tls is on, for apps that cannot pin
    # a certificate (Home Assistant's Ollama integration); what crosses it is readable on the LAN.
    tls: bool = True


@dataclass(frozen=True)
class UpdateConfig:
    """Software updates (edgellm/update/, docs/update-format.md)."""

    root: str = "/opt/edgellm"  # versions/ side by side, the current and trial links, status.json
    service: str = "edgellm.service"  # the systemd unit restarted on the new version
    # A command that controls the service instead of systemctl, for a box without systemd: run with
    # "stop" (returning once it has stopped), "start" or "restart" appended. Empty: systemctl.
    control: tuple[str, ...] = ()
    health_timeout: str = "15m"  # from the restart until /health answers ok on the new version
    settle: str = "30s"  # how long it must then stay up and healthy; or it is rolled back
    model_keys: bool = False  # true: keys trusted for model bundles may sign software updates too


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    prompts: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    bundles: BundlesConfig = field(default_factory=BundlesConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "defaults"

    @property
    def memory_limit(self) -> int:
        """The most memory models may ever have here: the budget, or all the RAM but the reserve."""
        if self.models.memory_budget:
            return parse_size(self.models.memory_budget)
        # All the RAM (MemTotal, what psutil.virtual_memory().total says), without importing psutil.
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total - parse_size(self.models.memory_reserve or "0")

    @property
    def trusted_keys_dir(self) -> str:
        return self.bundles.trusted_keys or str(Path(self.server.state_dir) / "trusted-keys")

    def with_overrides(self, **sections: dict[str, object]) -> Config:
        """Return a copy with command-line values (None = not given) applied over the file."""
        replaced = {}
        for name, values in sections.items():
            given = {k: v for k, v in values.items() if v is not None}
            replaced[name] = dataclasses.replace(getattr(self, name), **given)
        return dataclasses.replace(self, **replaced)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "engine": EngineConfig,
    "models": ModelsConfig,
    "bundles": BundlesConfig,
    "discovery": DiscoveryConfig,
    "relay": RelayConfig,
    "ollama": OllamaConfig,
    "update": UpdateConfig,
    "log": LogConfig,
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("engine", "flash_attn"): ("auto", "on", "off"),
    ("engine", "backend"): ("auto", "cuda", "vulkan", "cpu"),
    ("engine", "cache_type_k"): ("f16", "q8_0", "q4_0"),
    ("engine", "cache_type_v"): ("f16", "q8_0", "q4_0"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("bundles", "policy"): ("require-signature", "allow-unsigned"),
    ("server", "tls"): ("auto", "off"),
}

_RANGES: dict[tuple[str, str], tuple[int, int]] = {
    ("server", "port"): (0, 65535),
    ("ollama", "port"): (0, 65535),
    ("server", "max_body_bytes"): (1024, 1 << 30),
    ("server", "max_connections"): (1, 65536),
    ("server", "max_header_bytes"): (1024, 1 << 20),
    ("server", "max_headers"): (8, 1000),
    ("server", "max_request_line"): (256, 1 << 20),
    ("engine", "n_ctx"): (16, 1 << 20),
    ("engine", "n_batch"): (1, 1 << 16),
    ("engine", "n_ubatch"): (1, 1 << 16),
    ("engine", "n_threads"): (0, 1024),
    ("engine", "n_gpu_layers"): (-1, 10000),
    ("engine", "parallel"): (1, 256),
    ("engine", "max_queue"): (0, 100000),
    ("models", "max_loaded"): (1, 64),
}


# Durations that must be a positive number of seconds (a time limit that is never reached is none).
_TIME_LIMITS = {("server", "header_timeout"), ("server", "body_timeout"), ("server", "keep_alive_timeout"),
                ("update", "health_timeout"), ("update", "settle")}
_PARSED = {
    ("server", "header_timeout"): parse_duration,
    ("server", "body_timeout"): parse_duration,
    ("server", "keep_alive_timeout"): parse_duration,
    ("engine", "prompt_cache_memory"): parse_size,
    ("engine", "prompt_cache_disk"): parse_size,
    ("models", "memory_budget"): parse_size,
    ("models", "memory_reserve"): parse_size,
    ("models", "keep_alive"): parse_duration,
    ("models", "min_keep_alive"): parse_duration,
    ("models", "max_keep_alive"): parse_duration,
    ("models", "load_timeout"): parse_duration,
    ("relay", "connect_timeout"): parse_duration,
    ("relay", "first_byte_timeout"): parse_duration,
    ("relay", "idle_timeout"): parse_duration,
    ("relay", "refresh"): parse_duration,
    ("relay", "ttft_budget"): parse_duration,
    ("relay", "breaker_cooldown"): parse_duration,
    ("update", "health_timeout"): parse_duration,
    ("update", "settle"): parse_duration,
}


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the defaults, "-" reads it from stdin (a file
    root opened for a process that may not open it itself: the USB import)."""
    if path is None:
        return Config()
    source = "stdin" if str(path) == "-" else str(path)
    try:
        if str(path) == "-":
            data = tomllib.load(sys.stdin.buffer)
        else:
            with open(path, "rb") as f:
                data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not valid TOML: the file is not UTF-8 text") from None
    return from_dict(data, source)


def from_dict(data: dict, source: str) -> Config:
    sections: dict[str, typing.Any] = {}  # each a section's own dataclass
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section or key '{name}' (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{name}' must be a table: write [{name}] above its keys")
        sections[name] = _section(_SECTIONS[name], name, table, source)
    config = Config(**sections, source=source)
    for origin in config.server.cors_origins:
        # Any scheme: apps' pages have their own (Obsidian's is app://obsidian.md).
        if not re.fullmatch(r"[a-z][a-z0-9+.\-]*://[A-Za-z0-9.\-\[\]:]+", origin):
            raise ConfigError(f"{source}: [server] cors_origins: {origin!r} is not an origin such as "
                              "http://homeassistant.local:8123 (a scheme and a host, no path, never *)")
    if config.engine.cache_type_v != "f16" and config.engine.flash_attn == "off":
        raise ConfigError(f"{source}: [engine] cache_type_v = {config.engine.cache_type_v!r} needs flash attention "
                          "(llama.cpp cannot use a quantized V cache without it): set flash_attn to auto or on, "
                          "or cache_type_v to f16")
    for network in config.server.keyless_addresses:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{source}: [server] keyless_addresses: {network!r} is not an address or a network "
                              "such as 192.168.1.20 or 192.168.1.0/24") from None
    if config.ollama.port and config.ollama.port == config.server.port:
        raise ConfigError(f"{source}: [ollama] port {config.ollama.port} is [server] port too: Ollama's API is served "
                          "there already; set another port (Ollama's is 11434), or 0 for none")
    if config.engine.parallel > config.engine.n_batch:
        raise ConfigError(f"{source}: [engine] parallel ({config.engine.parallel}) cannot exceed n_batch "
                          f"({config.engine.n_batch}): every running sequence needs a place in each batch")
    return config


def _section(cls: type, name: str, table: dict, source: str) -> object:
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{source}: [{name}] {key}: unknown key (known: {known})")
        if (name, key) == ("server", "tls") and not isinstance(value, str):
            values[key] = _tls_files(value, f"{source}: [server] tls")
            continue
        values[key] = _check(hints[key], value, f"{source}: [{name}] {key}")
        if (name, key) in _CHOICES and value not in _CHOICES[name, key]:
            choices = ", ".join(_CHOICES[name, key])
            raise ConfigError(f"{source}: [{name}] {key}: must be one of {choices}, got {value!r}")
        low, high = _RANGES.get((name, key), (None, None))
        if low is not None and not low <= value <= high:
            raise ConfigError(f"{source}: [{name}] {key}: must be from {low} to {high}, got {value}")
        parse = _PARSED.get((name, key))
        if parse is not None and value != "":
            try:
                parsed = parse(value)
            except ValueError as e:
                raise ConfigError(f"{source}: [{name}] {key}: {e}") from None
            if (name, key) in _TIME_LIMITS and not parsed:
                raise ConfigError(f"{source}: [{name}] {key}: must be a time limit such as 10s, got {value!r}")
    return cls(**values)


def _tls_files(table: object, where: str) -> TLSFiles:
    if not isinstance(table, dict) or set(table) - {"cert", "key"} or not isinstance(table.get("cert"), str) \
            or not isinstance(table.get("key", ""), str) or not table["cert"]:
        raise ConfigError(f'{where}: must be "auto", "off" or a table {{cert = "FILE", key = "FILE"}}, '
                          f"got {table!r}")
    return TLSFiles(cert=table["cert"], key=table.get("key", ""))


def _check(hint: object, value: object, where: str) -> object:
    """Check one value against its field type; TOML arrays become tuples."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is str or hint == str | TLSFiles:  # tls: _tls_files took the table form
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if isinstance(value, list) and ok:
            value = tuple(value)
    else:  # pragma: no cover - a field type this module does not know yet
        raise TypeError(f"unsupported config field type {hint!r}")
    if not ok:
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {_describe(type(value))}")
    return value


def _describe(t: object) -> str:
    if typing.get_origin(t) is tuple:
        return "an array of strings"
    names: dict[object, str] = {bool: "a boolean", int: "an integer", str: "a string", float: "a number",
                                list: "an array", dict: "a table"}
    return names.get(t, getattr(t, "__name__", str(t)))


def is_loopback(host: str) -> bool:
    """True when binding `host` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credential(name: str) -> str:
    """The file systemd passed as credential `name` (LoadCredential=), or "" when there is none.

    The appliance's unit hands the API keys over this way: they stay readable by root only
    on disk, and the service sees them in its own private, unswappable directory."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    path = Path(directory) / name
    return str(path) if directory and path.is_file() else ""


def read_keys(keys: tuple[str, ...], key_file: str, where: str) -> frozenset[str]:
    """Keys given inline plus those in a key file (one per line, '#' comments)."""
    found = {k for k in keys if k}
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {key_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {key_file} is not UTF-8 text") from None
        found.update(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return frozenset(found)

"""A bundle's manifest: what it holds, checked strictly before anything is trusted or written.

docs/bundle-format.md is the specification; this is its parser and writer.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Protocol

from edgellm.errors import InvalidRequest
from edgellm.modelfile import defaults as sampling_defaults
from edgellm.units import timestamp

FORMAT = "edgellm-bundle"
VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.minisig"
FILES = "files"
MAX_MANIFEST = 1 << 20  # bytes: a manifest is a few KiB, chat templates included
MAX_FILE = (1 << 32) - 1  # FAT32's limit: bigger models travel as GGUF split files
MAX_MODELS = 64
MAX_FILES = 256
# Portable on FAT32, exFAT and ext4; never a path.
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.gguf$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")


class ManifestError(InvalidRequest):
    """The manifest is not one edgellm can accept; the message says where and why."""

    code = "bad_manifest"


@dataclass
class BundleFile:
    name: str
    size: int
    sha256: str


@dataclass
class BundleModel:
    id: str
    files: list[BundleFile]
    aliases: list[str] = field(default_factory=list)
    architecture: str = ""
    quantization: str = ""
    context_length: int = 0
    parameters: int = 0
    defaults: dict[str, int | float] = field(default_factory=dict)
    chat_template: str | None = None
    license: str = ""
    min_edgellm_version: str = "0.1.0"


class Listing(Protocol):
    """What a bundle's reader checks its files against: a model bundle's manifest, or an update's."""

    def files(self) -> list[BundleFile]: ...


def kind(data: bytes) -> str:
    """The `format` a manifest claims ("edgellm-bundle", "edgellm-update"), or "" if it names
    none: which parser to check it with."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    return doc["format"] if isinstance(doc, dict) and isinstance(doc.get("format"), str) else ""


@dataclass
class Manifest:
    creator: str
    created: str
    models: list[BundleModel]
    format: str = FORMAT
    version: int = VERSION

    def files(self) -> list[BundleFile]:
        return [f for m in self.models for f in m.files]

    def dumps(self) -> bytes:
        record = asdict(self)
        ordered = {"format": record.pop("format"), "version": record.pop("version"), **record}
        return (json.dumps(ordered, indent=2, ensure_ascii=False) + "\n").encode()


def parse(data: bytes, source: str) -> Manifest:
    """Parse and check a manifest; ManifestError names the first problem."""
    if len(data) > MAX_MANIFEST:
        raise ManifestError(f"{source}: {len(data)} bytes; a manifest may have at most {MAX_MANIFEST}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{source}: not JSON ({e})") from None
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply") from None
    where = source

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ManifestError(f"{where}: {message}")

    need(isinstance(doc, dict), "expected a JSON object")
    need(doc.get("format") == FORMAT, f"'format' must be {FORMAT!r}")
    need(isinstance(doc.get("version"), int), "'version' must be an integer")
    need(doc["version"] <= VERSION, f"format version {doc['version']} is newer than this edgellm reads "
                                    f"({VERSION}); upgrade edgellm")
    unknown = set(doc) - {"format", "version", "creator", "created", "models"}
    need(not unknown, f"unknown keys {sorted(unknown)}")
    need(isinstance(doc.get("creator"), str) and len(doc["creator"]) <= 256, "'creator' must be a short string")
    need(isinstance(doc.get("created"), str) and len(doc["created"]) <= 64 and is_time(doc["created"]),
         "'created' must be an ISO 8601 time such as 2026-11-22T06:00:00Z (it orders the bundles of a model)")
    models = doc.get("models")
    need(isinstance(models, list) and 0 < len(models) <= MAX_MODELS, f"'models' must list 1 to {MAX_MODELS} models")
    parsed, names, files = [], set(), set()
    for i, m in enumerate(models):
        where = f"{source}: models[{i}]"
        need(isinstance(m, dict), "expected an object")
        unknown = set(m) - {f.name for f in BundleModel.__dataclass_fields__.values()}
        need(not unknown, f"unknown keys {sorted(unknown)}")
        need(isinstance(m.get("id"), str) and NAME_RE.fullmatch(m["id"]) is not None,
             "'id' must be letters, digits and . _ : - (up to 128)")
        aliases = m.get("aliases", [])
        need(isinstance(aliases, list) and len(aliases) <= 16
             and all(isinstance(a, str) and NAME_RE.fullmatch(a) for a in aliases), "'aliases' must be up to 16 names")
        for name in [m["id"], *aliases]:
            need(name not in names, f"the name {name!r} is used twice")
            names.add(name)
        entries = m.get("files")
        need(isinstance(entries, list) and 0 < len(entries) <= MAX_FILES, "'files' must list 1 to 256 files")
        bundle_files = []
        for j, f in enumerate(entries):
            where = f"{source}: models[{i}].files[{j}]"
            need(isinstance(f, dict) and set(f) == {"name", "size", "sha256"}, "expected name, size and sha256")
            need(isinstance(f["name"], str) and FILE_RE.fullmatch(f["name"]) is not None,
                 f"file name {f['name']!r} must be a plain .gguf name (letters, digits, . _ -), not a path")
            need(f["name"].lower() not in files, f"the file {f['name']!r} is listed twice (names are compared "
                                                 "ignoring case, as on FAT32)")
            files.add(f["name"].lower())
            need(isinstance(f["size"], int) and not isinstance(f["size"], bool) and 0 < f["size"] <= MAX_FILE,
                 f"size of {f['name']} must be 1 to {MAX_FILE} bytes (larger models travel as split files)")
            need(isinstance(f["sha256"], str) and SHA_RE.fullmatch(f["sha256"]) is not None,
                 f"sha256 of {f['name']} must be 64 lowercase hex digits")
            bundle_files.append(BundleFile(f["name"], f["size"], f["sha256"]))
        where = f"{source}: models[{i}]"
        for key, kind in (("architecture", str), ("quantization", str), ("license", str)):
            need(isinstance(m.get(key, ""), kind) and len(m.get(key, "")) <= 256, f"'{key}' must be a short string")
        for key in ("context_length", "parameters"):
            need(isinstance(m.get(key, 0), int) and m.get(key, 0) >= 0, f"'{key}' must be a whole number")
        need(isinstance(m.get("defaults", {}), dict), "'defaults' must be an object")
        try:
            defaults = sampling_defaults.check(m.get("defaults", {}))
        except ValueError as e:
            raise ManifestError(f"{where}: defaults: {e}") from None
        template = m.get("chat_template")
        need(template is None or (isinstance(template, str) and len(template) <= 65536),
             "'chat_template' must be a string (up to 64 KiB) or null")
        version = m.get("min_edgellm_version", "0.1.0")
        need(isinstance(version, str) and VERSION_RE.fullmatch(version) is not None,
             "'min_edgellm_version' must look like 1.2.3")
        parsed.append(BundleModel(
            id=m["id"], files=bundle_files, aliases=list(aliases), architecture=m.get("architecture", ""),
            quantization=m.get("quantization", ""), context_length=m.get("context_length", 0),
            parameters=m.get("parameters", 0), defaults=dict(defaults), chat_template=template,
            license=m.get("license", ""), min_edgellm_version=version))
    return Manifest(creator=doc["creator"], created=doc["created"], models=parsed, version=doc["version"])


def is_time(text: str) -> bool:
    try:
        timestamp(text)
    except ValueError:
        return False
    return True


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])

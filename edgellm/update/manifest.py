"""An update bundle's manifest: the edgellm version it installs, what it may update from, and
every wheel with its SHA-256. docs/update-format.md is the specification; this is its parser."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from edgellm.bundles.manifest import MAX_MANIFEST, SHA_RE, VERSION_RE, BundleFile, ManifestError, is_time

FORMAT = "edgellm-update"
VERSION = 1
MAX_FILES = 256
MAX_FILE = (1 << 32) - 1  # FAT32's limit, as for model bundles
# A wheel's file name (PEP 427), portable to FAT32: never a path.
WHEEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\.whl$")
PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
MACHINE_RE = re.compile(r"^[a-z0-9_]{1,32}$")
KEYS = ("format", "version", "creator", "created", "edgellm_version", "min_from_version", "python", "machine",
        "files")


@dataclass
class UpdateManifest:
    creator: str
    created: str
    edgellm_version: str  # what the box runs once updated
    min_from_version: str  # the oldest version this update may replace
    python: str  # the interpreter the wheels are for ("3.11"): the board's own Python
    machine: str  # the CPU the wheels are for (uname -m: "aarch64"), or "any" for pure Python
    wheels: list[BundleFile]
    format: str = FORMAT
    version: int = VERSION

    def files(self) -> list[BundleFile]:
        return self.wheels

    def dumps(self) -> bytes:
        record = asdict(self)
        record["files"] = record.pop("wheels")
        return (json.dumps({k: record[k] for k in KEYS}, indent=2, ensure_ascii=False) + "\n").encode()


def parse(data: bytes, source: str) -> UpdateManifest:
    """Parse and check an update manifest; ManifestError names the first problem."""
    if len(data) > MAX_MANIFEST:
        raise ManifestError(f"{source}: {len(data)} bytes; a manifest may have at most {MAX_MANIFEST}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: not JSON ({e})") from None

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ManifestError(f"{source}: {message}")

    need(isinstance(doc, dict), "expected a JSON object")
    need(doc.get("format") == FORMAT, f"'format' must be {FORMAT!r}")
    need(isinstance(doc.get("version"), int) and not isinstance(doc["version"], bool), "'version' must be an integer")
    need(doc["version"] <= VERSION, f"update format version {doc['version']} is newer than this edgellm reads "
                                    f"({VERSION})")
    unknown = set(doc) - set(KEYS)
    need(not unknown, f"unknown keys {sorted(unknown)}")
    need(isinstance(doc.get("creator"), str) and len(doc["creator"]) <= 256, "'creator' must be a short string")
    need(isinstance(doc.get("created"), str) and len(doc["created"]) <= 64 and is_time(doc["created"]),
         "'created' must be an ISO 8601 time such as 2026-11-22T06:00:00Z")
    for key in ("edgellm_version", "min_from_version"):
        need(isinstance(doc.get(key), str) and VERSION_RE.fullmatch(doc[key]) is not None,
             f"'{key}' must look like 1.2.3")
    need(isinstance(doc.get("python"), str) and PYTHON_RE.fullmatch(doc["python"]) is not None,
         "'python' must look like 3.11")
    need(isinstance(doc.get("machine"), str) and MACHINE_RE.fullmatch(doc["machine"]) is not None,
         "'machine' must be a CPU name such as aarch64, or any")
    entries = doc.get("files")
    need(isinstance(entries, list) and 0 < len(entries) <= MAX_FILES, f"'files' must list 1 to {MAX_FILES} wheels")
    wheels, seen = [], set()
    for j, f in enumerate(entries):
        need(isinstance(f, dict) and set(f) == {"name", "size", "sha256"}, f"files[{j}]: expected name, size and "
                                                                            "sha256")
        need(isinstance(f["name"], str) and WHEEL_RE.fullmatch(f["name"]) is not None,
             f"files[{j}]: {f['name']!r} must be a wheel's file name (letters, digits, . _ + -, ending .whl)")
        need(f["name"].lower() not in seen, f"the file {f['name']!r} is listed twice (ignoring case, as on FAT32)")
        seen.add(f["name"].lower())
        need(isinstance(f["size"], int) and not isinstance(f["size"], bool) and 0 < f["size"] <= MAX_FILE,
             f"size of {f['name']} must be 1 to {MAX_FILE} bytes")
        need(isinstance(f["sha256"], str) and SHA_RE.fullmatch(f["sha256"]) is not None,
             f"sha256 of {f['name']} must be 64 lowercase hex digits")
        wheels.append(BundleFile(f["name"], f["size"], f["sha256"]))
    need(any(wheel_project(w.name) == "edgellm" and wheel_version(w.name) == doc["edgellm_version"] for w in wheels),
         f"no edgellm-{doc['edgellm_version']} wheel among the files")
    return UpdateManifest(creator=doc["creator"], created=doc["created"], edgellm_version=doc["edgellm_version"],
                          min_from_version=doc["min_from_version"], python=doc["python"], machine=doc["machine"],
                          wheels=wheels, version=doc["version"])


def wheel_project(name: str) -> str:
    """The normalised project name of a wheel file (PEP 427/503): 'llama_cpp_python' -> 'llama-cpp-python'."""
    return re.sub(r"[-_.]+", "-", name.split("-", 1)[0]).lower()


def wheel_version(name: str) -> str:
    parts = name[:-len(".whl")].split("-")
    return parts[1] if len(parts) >= 5 else ""


def wheel_tags(name: str) -> tuple[set[str], set[str], set[str]]:
    """A wheel's Python, ABI and platform tags (compressed tag sets expanded)."""
    parts = name[:-len(".whl")].split("-")
    if len(parts) < 5:
        return set(), set(), set()
    return set(parts[-3].split(".")), set(parts[-2].split(".")), set(parts[-1].split("."))

"""Make, verify and copy update bundles: the layout of model bundles (bundles/reader.py reads
both), with a manifest of wheels, always signed by a key trusted for software."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm import __version__
from edgellm.bundles import signing
from edgellm.bundles.create import Part, hash_parts, write
from edgellm.bundles.manifest import FILES, MANIFEST, SIGNATURE, BundleFile, ManifestError, kind, version_tuple
from edgellm.bundles.reader import DirectorySource, StreamSource, TarSource
from edgellm.config import Config
from edgellm.files import fsync_dir, write_atomic
from edgellm.progress import Progress
from edgellm.store.registry import DISK_MARGIN, copy_hashing
from edgellm.units import MiB
from edgellm.update import UpdateError
from edgellm.update.manifest import MAX_FILE, WHEEL_RE, UpdateManifest, parse, wheel_project, wheel_tags, wheel_version

Source = DirectorySource | TarSource | StreamSource


def create(wheel_dir: Path, out: Path, *, key: signing.SecretKey, min_from: str,
           progress: Progress | None = None) -> UpdateManifest:
    """An update bundle of every wheel in `wheel_dir`: one edgellm wheel and what it needs."""
    if out.exists() or out.is_symlink():
        raise UpdateError(f"{out}: already exists")
    wheels = sorted(p for p in wheel_dir.iterdir() if p.name.endswith(".whl")) if wheel_dir.is_dir() else []
    ours = [p for p in wheels if wheel_project(p.name) == "edgellm"]
    if len(ours) != 1:
        raise UpdateError(f"{wheel_dir}: {len(ours)} edgellm wheels; an update holds exactly one (and the "
                          "wheels it needs)")
    for p in wheels:
        if not WHEEL_RE.fullmatch(p.name) or not 0 < p.stat().st_size <= MAX_FILE:
            raise UpdateError(f"{p}: not a wheel an update can carry (its name, or a size over 4 GiB)")
    version = wheel_version(ours[0].name)
    if version_tuple(min_from) > version_tuple(version):
        raise UpdateError(f"--min-from {min_from} is newer than the update itself ({version})")
    parts = [Part(p.name, p, p.stat().st_size) for p in wheels]
    hash_parts(parts, progress)
    manifest = UpdateManifest(
        creator=f"edgellm {__version__} on {socket.gethostname()}",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), edgellm_version=version,
        min_from_version=min_from, python=_python(wheels), machine=_machine(wheels),
        wheels=[BundleFile(p.name, p.size, p.sha256) for p in parts])
    data = manifest.dumps()
    write(out, data, key.sign(data, f"edgellm update {version}, {manifest.created}"), parts, progress)
    return manifest


def _python(wheels: list[Path]) -> str:
    """The one CPython the wheels' ABI ties them to (cp311 -> 3.11; abi3 and none tie them to
    none); this one's if none does."""
    found = {f"3.{m.group(1)}" for p in wheels for tag in wheel_tags(p.name)[1]
             if (m := re.fullmatch(r"cp3(\d+)[dmu]*", tag))}
    if len(found) > 1:
        raise UpdateError(f"the wheels are for several Pythons ({', '.join(sorted(found))}): one board, one Python")
    return found.pop() if found else f"{sys.version_info.major}.{sys.version_info.minor}"


def _machine(wheels: list[Path]) -> str:
    """The one CPU the binary wheels are for (manylinux_2_17_aarch64 -> aarch64), or any."""
    found = {re.sub(r"^(many|musl)?linux(_\d+_\d+|\d+)?_", "", tag) for p in wheels for tag in wheel_tags(p.name)[2]
             if tag != "any"}
    if len(found) > 1:
        raise UpdateError(f"the wheels are for several CPUs ({', '.join(sorted(found))}): one board, one CPU")
    return found.pop() if found else "any"


def keys(config: Config) -> tuple[list[signing.PublicKey], list[str]]:
    """The keys trusted to sign software, and why each unusable key file was skipped."""
    return signing.trusted_keys(config.trusted_keys_dir, updates=True, model_keys=config.update.model_keys)


def is_update(source: Source) -> bool:
    """Whether the bundle's manifest says it is an update (read once; the source reads it again)."""
    if isinstance(source, StreamSource):
        raise TypeError("a stream is read once")
    data, _ = source.manifest()
    return kind(data) == "edgellm-update"


@dataclass
class Verified:
    manifest: UpdateManifest
    key_id: str  # the key that signed it
    data: bytes  # the manifest as signed
    signature: str


def verify(source: Source, trusted: list[signing.PublicKey], *, running: str,
           allow_downgrade: bool = False) -> Verified:
    """The manifest, once the signature, the versions, this box's Python and CPU, and the
    source's layout check out; and the signing key's id. Files are hashed as they are copied."""
    data, signature = source.manifest()
    try:
        manifest = parse(data, f"{source.name}: manifest.json")
    except ManifestError as e:
        raise UpdateError(str(e)) from None
    if signature is None:
        raise UpdateError(f"{source.name}: not signed ({SIGNATURE} is missing): software updates must be signed "
                          "by a key trusted for updates (NAME.update.pub in the trusted keys)")
    if not trusted:
        raise UpdateError(f"{source.name}: no key here is trusted to sign software updates (put the signer's "
                          "public key in the trusted keys as NAME.update.pub)")
    try:
        key, _ = signing.verify(data, signature, trusted, source=f"{source.name}: {SIGNATURE}")
    except signing.SignatureError as e:
        raise UpdateError(f"{e} (software updates are checked against the keys trusted for updates, "
                          "NAME.update.pub)") from None
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.python != here:
        raise UpdateError(f"{source.name}: the update is for Python {manifest.python}; this box runs {here}")
    if manifest.machine not in ("any", platform.machine()):
        raise UpdateError(f"{source.name}: the update is for {manifest.machine}; this box is {platform.machine()}")
    new = manifest.edgellm_version
    if version_tuple(running) < version_tuple(manifest.min_from_version):
        raise UpdateError(f"{source.name}: edgellm {new} updates {manifest.min_from_version} or newer; this box runs "
                          f"{running}: apply an update in between first")
    if version_tuple(new) < version_tuple(running) and not allow_downgrade:
        raise UpdateError(f"{source.name}: edgellm {new} is older than the {running} this box runs: refused as a "
                          "downgrade (an admin can force it: --allow-downgrade)")
    source.check(manifest)
    return Verified(manifest, key.id, data, signature)


def copy(source: Source, verified: Verified, out: Path, progress: Progress | None = None) -> None:
    """The bundle into `out` (a new directory): each file hashed in the same pass and fsynced, an
    UpdateError naming one that differs from the manifest; then the manifest and its signature,
    so that `out` is a bundle again, to be verified again by whoever reads it next."""
    manifest = verified.manifest
    wanted = {f.name: f for f in manifest.files()}
    total = sum(f.size for f in manifest.files())
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free - total < DISK_MARGIN:
        raise UpdateError(f"{source.name}: the update needs {total // MiB} MiB of disk and {out.parent} has "
                          f"{free // MiB} MiB free (of which {DISK_MARGIN // MiB} MiB stay free)")
    (out / FILES).mkdir(parents=True)
    done = 0
    name = ""

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("copying", name, done, total)

    items = (source.files(manifest) if isinstance(source, StreamSource)
             else ((f.name, source.open(f.name)) for f in manifest.files()))
    for name, stream in items:
        with stream, open(out / FILES / name, "xb") as dst:
            sha, size = copy_hashing(stream, dst, step, limit=wanted[name].size)
            dst.flush()
            os.fsync(dst.fileno())
        if sha != wanted[name].sha256 or size != wanted[name].size:
            raise UpdateError(f"{source.name}: files/{name} does not match the manifest's SHA-256 (it was changed "
                              "or damaged)")
    fsync_dir(out / FILES)
    write_atomic(out / MANIFEST, verified.data)
    write_atomic(out / SIGNATURE, verified.signature)

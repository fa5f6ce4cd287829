"""Verify a bundle and install its models into the store, never losing or half-installing one.

The order of work:

1. read the manifest and check its signature against the trusted keys (or
   the policy allows unsigned bundles), then the source's layout: every
   hostile or damaged input is refused here, before a byte is written;
2. against the catalog as committed: refuse a model that would replace an
   installed one with a bundle not newer than the installed one's (unless
   downgrades are allowed) or signed by another key than the installed one's,
   or that would take a name in use; check the free disk space;
3. into a staging directory of this import's own in the store's tmp/: copy
   each file not installed yet, hashing in the same pass, fsync (a file whose
   SHA-256 or size differs from the manifest's ends the import); hard-link
   each installed one (so that a removal meanwhile loses nothing);
4. only from these verified copies, read each GGUF header and check that
   each model can ever load on this box (its memory estimate at the smallest
   context);
5. under the store's lock, held for this step alone: check 2 again against
   the catalog as it is now, rename each file into blobs/, fsync the
   directory, then replace the catalog (registry.py).

No lock is held while bundle data is read, so a slow stick or upload never
keeps others from reading the store, nor other imports from running. A crash
before 5 leaves a staging directory that the next start deletes; during 5,
blobs that no entry names yet, deleted the same way; the catalog is replaced
atomically. So a model is either fully installed or absent, and running the
import again finishes the job. The running service notices the new catalog
within a second.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm import __version__
from edgellm.bundles import history, signing
from edgellm.bundles.manifest import (
    SIGNATURE,
    BundleFile,
    BundleModel,
    Listing,
    Manifest,
    ManifestError,
    parse,
    version_tuple,
)
from edgellm.bundles.reader import BundleError, DirectorySource, StreamSource, TarSource
from edgellm.config import Config, EngineConfig
from edgellm.errors import EdgeError
from edgellm.modelfile import gguf, memory
from edgellm.progress import Progress
from edgellm.store.registry import DISK_MARGIN, Entry, ModelFile, Registry, StoreError, copy_hashing, describe
from edgellm.units import MiB, timestamp

Source = DirectorySource | TarSource | StreamSource


@dataclass
class Policy:
    keys: list[signing.PublicKey]
    require_signature: bool
    skipped: list[str] = field(default_factory=list)  # why each unusable trusted-keys file was skipped

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        keys, skipped = signing.trusted_keys(config.trusted_keys_dir)
        return cls(keys, require_signature=config.bundles.policy == "require-signature", skipped=skipped)


@dataclass
class Outcome:
    model: str
    status: str  # installed, replaced, unchanged


def signed_by(key_id: str) -> str:
    return f"key {key_id}" if key_id else "unsigned"


def verify(source: Source, policy: Policy) -> tuple[Manifest, str]:
    """The manifest, once its signature and the source's layout check out; and the id of the key
    that signed it ("" when unsigned)."""
    data, signature = source.manifest()
    try:
        manifest = parse(data, f"{source.name}: manifest.json")
    except ManifestError as e:
        raise BundleError(str(e)) from None
    if signature is None:
        if policy.require_signature:
            raise BundleError(f"{source.name}: not signed ({SIGNATURE} is missing), and the policy requires a "
                              "signature (set [bundles] policy = \"allow-unsigned\" only for development)")
        key_id = ""
    else:
        try:
            key, _ = signing.verify(data, signature, policy.keys, source=f"{source.name}: {SIGNATURE}")
        except signing.SignatureError as e:
            raise BundleError(str(e)) from None
        key_id = key.id
    for model in manifest.models:
        if version_tuple(model.min_edgellm_version) > version_tuple(__version__):
            raise BundleError(f"{source.name}: model {model.id} needs edgellm {model.min_edgellm_version} or newer; "
                              f"this is {__version__}")
    source.check(manifest)
    return manifest, key_id


def import_bundle(source: Source, registry: Registry, policy: Policy, *, engine: EngineConfig, memory_limit: int,
                  progress: Progress | None = None, allow_downgrade: bool = False) -> list[Outcome]:
    """Verify and install; `allow_downgrade` lets a bundle replace a model installed from a newer one.
    Either way, the import is recorded in the state dir's history (history.py)."""
    state_dir = registry.root.parent
    try:
        outcomes = _import(source, registry, policy, engine=engine, memory_limit=memory_limit, progress=progress,
                           allow_downgrade=allow_downgrade)
    except (EdgeError, OSError) as e:
        with registry.locked():
            history.record(state_dir, source.name, f"refused: {e.message if isinstance(e, EdgeError) else e}", [])
        raise
    with registry.locked():
        history.record(state_dir, source.name, "imported", [{"id": o.model, "status": o.status} for o in outcomes])
    return outcomes


def _import(source: Source, registry: Registry, policy: Policy, *, engine: EngineConfig, memory_limit: int,
            progress: Progress | None, allow_downgrade: bool) -> list[Outcome]:
    manifest, key_id = verify(source, policy)
    unchanged = _check(source, manifest, key_id, registry.entries(), allow_downgrade)
    with registry.staging() as staging:
        try:
            staged = _stage(source, manifest, unchanged, registry, staging, progress)
        except tarfile.TarError as e:
            raise BundleError(f"{source.name}: a damaged or truncated tar ({e})") from None
        new = []
        for model in manifest.models:
            if model.id not in unchanged:
                headers = [_header(source, staged[f.sha256], f) for f in model.files]
                _check_memory(source, model, headers, engine, memory_limit)
                new.append(_entry(model, manifest, registry, source, key_id, headers))
        with registry.locked():
            entries = registry.entries()
            now = _check(source, manifest, key_id, entries, allow_downgrade)  # another import may have committed
            if unchanged - now:
                raise BundleError(f"{source.name}: the installed models changed during the import; run it again")
            new = [e for e in new if e.id not in now]
            installed = {e.id for e in entries}
            try:
                for sha in {f.sha256 for e in new for f in e.files}:
                    registry.place(staged[sha], sha)
                replaced = {e.id for e in new}
                registry.write([e for e in entries if e.id not in replaced] + new)
            finally:
                registry.recover()  # blobs placed for nothing (a failed write), or of replaced models
    return [Outcome(m.id, "unchanged" if m.id in now else "replaced" if m.id in installed else "installed")
            for m in manifest.models]


def _check(source: Source, manifest: Manifest, key_id: str, entries: list[Entry], allow_downgrade: bool) -> set[str]:
    """The ids of the manifest's models installed with the same files already (left as they are);
    BundleError for a replacement the rules refuse: by an older bundle, by another signer, or of
    another model's name."""
    by_id = {e.id: e for e in entries}
    unchanged = {m.id for m in manifest.models if m.id in by_id
                 and [f.sha256 for f in by_id[m.id].files] == [f.sha256 for f in m.files]}
    for model in manifest.models:
        old = by_id.get(model.id)
        if old is None or model.id in unchanged:
            continue
        if old.signer and old.signer != key_id:
            raise BundleError(f"{source.name}: model {model.id} was installed from a bundle signed by key "
                              f"{old.signer}, and this one is {signed_by(key_id)}: only that key may replace it "
                              f"(to change keys, remove the model first: edgellm models remove {model.id})")
        if old.bundle_created and not allow_downgrade \
                and timestamp(manifest.created) <= timestamp(old.bundle_created):
            raise BundleError(f"{source.name}: model {model.id}: this bundle was created {manifest.created}, not "
                              f"after the installed one's {old.bundle_created}: refused as a downgrade (allow it "
                              "with --allow-downgrade, or ?allow_downgrade=true for an upload)")
    replacing = {m.id for m in manifest.models} - unchanged
    taken = {n: e.id for e in entries if e.id not in replacing for n in e.names()}
    for model in manifest.models:
        if model.id in unchanged:
            continue
        for name in [model.id, *model.aliases]:
            if name in taken and taken[name] != model.id:
                raise BundleError(f"{source.name}: the name {name!r} of model {model.id} is already used by "
                                  f"installed model {taken[name]}")
    return unchanged


def _stage(source: Source, manifest: Manifest, unchanged: set[str], registry: Registry, staging: Path,
           progress: Progress | None) -> dict[str, Path]:
    """Every file of the models to install, by SHA-256, verified in `staging`: an installed one
    linked from its blob, any other copied from the bundle and checked against the manifest."""
    needed = {f.sha256: f for m in manifest.models if m.id not in unchanged for f in m.files}
    staged: dict[str, Path] = {}
    for sha in needed:
        try:
            os.link(registry.blob(sha), staging / registry.blob(sha).name)
        except OSError:  # not installed (or removed just now, or no hard links here): copied below
            continue
        staged[sha] = staging / registry.blob(sha).name
    wanted = {sha: f for sha, f in needed.items() if sha not in staged}
    total = sum(f.size for f in wanted.values())
    free = shutil.disk_usage(registry.root).free
    if total + DISK_MARGIN > free:
        raise BundleError(f"{source.name}: needs {total / MiB:.0f} MiB of disk for its files, but only "
                          f"{free / MiB:.0f} MiB are free (keeping {DISK_MARGIN / MiB:.0f} MiB spare)")
    done = 0

    def advance(name: str) -> Callable[[int], None]:
        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("importing", name, done, total)
        return step

    files = source.files(manifest) if isinstance(source, StreamSource) else (
        (f.name, None) for f in manifest.files())
    expected = {f.name: f for f in manifest.files()}
    for name, stream in files:
        f = expected[name]
        if f.sha256 not in wanted or f.sha256 in staged:
            continue  # linked from the store (or listed twice with the same content): not copied again
        path = staging / registry.blob(f.sha256).name
        if stream is not None:
            reader = stream
        else:
            assert not isinstance(source, StreamSource)  # whose files() gives each file with its stream
            reader = source.open(name)
        try:
            sha, size = registry.stage(reader, path, advance(name), limit=f.size)
        finally:
            if stream is None:
                reader.close()
        if size != f.size:
            raise BundleError(f"{source.name}: files/{name} is truncated ({size} of {f.size} bytes)")
        if sha != f.sha256:
            raise BundleError(f"{source.name}: files/{name} does not match the manifest's SHA-256 (it was "
                              f"changed or damaged): expected {f.sha256}, got {sha}")
        staged[sha] = path
    return staged


def _header(source: Source, path: Path, f: BundleFile) -> gguf.GGUFFile:
    """The header of a staged file, named as in the bundle."""
    with open(path, "rb") as stream:
        try:
            return gguf.read_from(stream, Path(f.name), f.size)
        except gguf.GGUFError as e:
            raise BundleError(f"{source.name}: files/{e}") from None


def _check_memory(source: Source, model: BundleModel, headers: list[gguf.GGUFFile], engine: EngineConfig,
                  limit: int) -> None:
    """Refuse a model that could never load here: not even at the smallest context with nothing else loaded."""
    n_ubatch = min(engine.n_ubatch, engine.n_batch)
    if memory.largest_context(headers, limit, parallel=engine.parallel, n_ubatch=n_ubatch):
        return
    smallest = memory.estimate(headers, n_ctx=256, parallel=engine.parallel, n_ubatch=n_ubatch)
    raise BundleError(f"{source.name}: model {model.id} can never load on this box: it needs about "
                      f"{smallest.describe()} even with n_ctx 256, and at most {limit / MiB:.0f} MiB can be "
                      "made free for models here")


def _entry(model: BundleModel, manifest: Manifest, registry: Registry, source: Source, key_id: str,
           headers: list[gguf.GGUFFile]) -> Entry:
    files = [ModelFile(f.name, f.sha256, f.size) for f in model.files]
    try:
        entry = describe([registry.blob(f.sha256) for f in model.files], model_id=model.id,
                         source=f"bundle {Path(source.name).name} ({signed_by(key_id)})", files=files,
                         headers=headers)
    except StoreError as e:  # a sampling default the file recommends that cannot be honoured
        raise BundleError(f"{source.name}: model {model.id}: {e}") from None
    entry.aliases = list(model.aliases)
    entry.license = model.license
    entry.chat_template = model.chat_template or ""
    entry.defaults.update(model.defaults)
    entry.bundle_created = manifest.created
    entry.signer = key_id
    return entry


def verify_files(source: DirectorySource | TarSource, manifest: Listing, progress: Progress | None = None) -> None:
    """Hash every file against the manifest (`edgellm bundle verify`); BundleError names the first bad one."""
    total = sum(f.size for f in manifest.files())
    done = 0
    for f in manifest.files():
        def step(n: int, name: str = f.name) -> None:
            nonlocal done
            done += n
            if progress:
                progress("importing", name, done, total)
        with source.open(f.name) as stream:
            sha, size = copy_hashing(stream, None, step, limit=f.size)
        if size != f.size or sha != f.sha256:
            raise BundleError(f"{source.name}: files/{f.name} does not match the manifest's SHA-256 (it was "
                              f"changed or damaged)")

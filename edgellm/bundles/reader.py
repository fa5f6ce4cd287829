"""Where a bundle is read from: a directory, a tar file, or a tar arriving as a stream.

Each source checks its own layout before the import writes anything: only
the manifest, its signature and the files the manifest lists, each a regular
file of the listed size; no paths that leave the bundle, no links (symbolic
or hard), devices or duplicates. Files are opened so that one swapped after
its check is refused rather than read or waited on (_open_file). A stream
cannot be checked ahead, so it is checked as it arrives and the import keeps
everything in temporary files until the stream has ended well (importer.py).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Literal, Protocol

from edgellm.bundles.manifest import FILES, MANIFEST, MAX_MANIFEST, SIGNATURE, Listing
from edgellm.errors import InvalidRequest

# Left on sticks by macOS and Windows; never part of a bundle.
IGNORED = (".DS_Store", "Thumbs.db", "desktop.ini")
MAX_MEMBERS = 1024  # a bundle holds at most 64 models of 256 files: more members is hostile
MAX_SIGNATURE = 4096
MAX_EXTENDED_HEADER = 64 << 10  # pax and GNU long-name headers: tarfile would read them whole


class Readable(Protocol):
    """What a stream must offer to be read from: an upload's body, a file."""

    def read(self, n: int = -1, /) -> bytes: ...


class _TarInfo(tarfile.TarInfo):
    """tarfile's member, refusing headers that would make it allocate without bound."""

    # _proc_pax and _proc_gnulong are private to tarfile, so its stubs do not declare them.
    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > MAX_EXTENDED_HEADER:
            raise BundleError(f"{self.name}: a {self.size}-byte extended header")
        return super()._proc_pax(tar)  # type: ignore[misc]

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > MAX_EXTENDED_HEADER:
            raise BundleError(f"{self.name}: a {self.size}-byte long-name header")
        return super()._proc_gnulong(tar)  # type: ignore[misc]


def _next(tar: tarfile.TarFile, where: str, seen: int) -> tarfile.TarInfo | None:
    """The next member, checked before tarfile would act on a hostile size."""
    if seen >= MAX_MEMBERS:
        raise BundleError(f"{where}: more than {MAX_MEMBERS} members")
    try:
        member = tar.next()
    except tarfile.TarError as e:
        raise BundleError(f"{where}: a damaged or truncated tar ({e})") from None
    if member is not None and member.size < 0:
        raise BundleError(f"{where}: {member.name} has a negative size")
    return member


def _data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A member's data; every member read is a regular file (_member_name refuses the rest)."""
    data = tar.extractfile(member)
    assert data is not None
    return data


def _ignored(name: str) -> bool:
    return name in IGNORED or name.startswith("._")


class BundleError(InvalidRequest):
    """A bundle that cannot be imported; the message names the file and the reason."""

    code = "bundle_refused"


# How every file of a bundle is opened: never through a symbolic link, and never waiting on a
# pipe or device put in the file's place after its check (open() of a FIFO blocks until a writer
# comes); what was opened is then checked with fstat.
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC


def _open_file(path: Path, dir_fd: int | None = None) -> tuple[IO[bytes], os.stat_result]:
    """A bundle file opened for reading (`path`'s last part, in `dir_fd` if given), once it is
    known to be one plain regular file: not a link of either kind, a device or a pipe."""
    try:
        fd = os.open(path.name if dir_fd is not None else path, _OPEN, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path}: a symbolic link (links are refused)") from None
        raise
    info = os.fstat(fd)
    problem = ("not a regular file (links, devices and pipes are refused)" if not stat.S_ISREG(info.st_mode)
               else "a hard link (links are refused)" if info.st_nlink > 1 else "")
    if problem:
        os.close(fd)
        raise BundleError(f"{path}: {problem}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info


class DirectorySource:
    """NAME.edgellm/ with manifest.json, manifest.json.minisig and files/.

    Read through descriptors of the directories, opened once: a directory renamed or replaced by
    a link after the check changes nothing read. Each file check() accepted is known by its
    inode, and open() gives that file or refuses."""

    seekable: Literal[True] = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._dir = os.open(path, _OPEN_DIR)  # the operator's path: it may be a link, nothing in it may
        self._files: int | None = None
        self._checked: dict[str, tuple[int, int, int]] = {}  # name -> device, inode, size

    def _read(self, name: str, limit: int, too_large: str) -> bytes | None:
        """A small file at the top of the bundle, or None when there is none."""
        try:
            f, info = _open_file(self.path / name, self._dir)
        except FileNotFoundError:
            return None
        with f:
            if info.st_size > limit:
                raise BundleError(f"{self.path / name}: {info.st_size} bytes; {too_large}")
            return f.read(limit)

    def manifest(self) -> tuple[bytes, str | None]:
        data = self._read(MANIFEST, MAX_MANIFEST, f"a manifest may have at most {MAX_MANIFEST}")
        if data is None:
            raise BundleError(f"{self.path}: no {MANIFEST}: not an edgellm bundle")
        signature = self._read(SIGNATURE, MAX_SIGNATURE, "too large for a minisign signature")
        return data, signature.decode(errors="replace") if signature is not None else None

    def check(self, manifest: Listing) -> None:
        expected = {f.name: f for f in manifest.files()}
        top = {e.name for e in os.scandir(self._dir) if not _ignored(e.name)}
        extra = top - {MANIFEST, SIGNATURE, FILES}
        if extra:
            raise BundleError(f"{self.path}: unexpected {', '.join(sorted(extra))} (a bundle holds "
                              f"{MANIFEST}, {SIGNATURE} and {FILES}/)")
        files = self.path / FILES
        if self._files is not None:
            os.close(self._files)
            self._files = None
        try:
            self._files = os.open(FILES, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=self._dir)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            raise BundleError(f"{files}: missing, or not a directory") from None
        self._checked = {}
        for entry in os.scandir(self._files):
            if _ignored(entry.name):
                continue
            where = files / entry.name
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{where}: not a regular file (links and devices are refused)")
            if info.st_nlink > 1:
                raise BundleError(f"{where}: a hard link (links are refused)")
            if entry.name not in expected:
                raise BundleError(f"{where}: not listed in the manifest")
            self._checked[entry.name] = (info.st_dev, info.st_ino, info.st_size)
        for name, f in expected.items():
            if name not in self._checked:
                raise BundleError(f"{files / name}: listed in the manifest but missing")
            size = self._checked[name][2]
            if size != f.size:
                raise BundleError(f"{files / name}: {size} bytes, the manifest says {f.size} "
                                  f"({'truncated' if size < f.size else 'too long'})")

    def open(self, name: str) -> IO[bytes]:
        """A file that check() accepted, still the same file (its inode) of the same size."""
        where = self.path / FILES / name
        if self._files is None or name not in self._checked:
            raise BundleError(f"{where}: not checked against the manifest")
        try:
            f, info = _open_file(where, self._files)
        except FileNotFoundError:
            raise BundleError(f"{where}: removed after the bundle was checked") from None
        if (info.st_dev, info.st_ino, info.st_size) != self._checked[name]:
            f.close()
            raise BundleError(f"{where}: replaced or changed in size after the bundle was checked")
        return f

    def close(self) -> None:
        for fd in (self._files, self._dir):
            if fd is not None:
                os.close(fd)
        self._files = None


def _member_name(member: tarfile.TarInfo, prefix: str) -> str:
    """The member's path inside the bundle, or BundleError for anything that is not plain."""
    raw = member.name
    while raw.startswith("./"):  # `tar cf x.tar -C NAME.edgellm .`
        raw = raw[2:]
    path = PurePosixPath(raw)
    if raw.startswith("/") or "\\" in raw or ".." in path.parts or any(p in ("", ".") for p in raw.split("/")[:-1]):
        raise BundleError(f"{raw}: an absolute path or one that leaves the bundle")
    if member.issym() or member.islnk():
        raise BundleError(f"{raw}: a link (links are refused)")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"{raw}: a device, pipe or other special file")
    name = raw.rstrip("/")
    if prefix:
        if not (name == prefix or name.startswith(prefix + "/")):
            raise BundleError(f"{raw}: outside the bundle's directory {prefix}/")
        name = name[len(prefix) + 1:]
    return name


def _prefix(first: str) -> str:
    """A tar made with `tar cf x.tar NAME.edgellm` puts everything under NAME.edgellm/."""
    head = first.rstrip("/").split("/")[0]
    return "" if head in (MANIFEST, SIGNATURE, FILES) else head


class TarSource:
    """An uncompressed tar holding the same tree, read with seeks (a file on a stick or disk)."""

    seekable: Literal[True] = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self.file, info = _open_file(path)
        self.size = info.st_size
        try:
            self.members = self._members()
        except BaseException:
            self.file.close()
            raise

    def _members(self) -> dict[str, tarfile.TarInfo]:
        path = self.path
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:", tarinfo=_TarInfo)
        except (tarfile.TarError, OSError) as e:
            raise BundleError(f"{path}: not an uncompressed tar ({e})") from None
        members: list[tarfile.TarInfo] = []
        while (member := _next(self.tar, str(path), len(members))) is not None:
            members.append(member)
        if not members:
            raise BundleError(f"{path}: an empty tar")
        prefix = _prefix(next((m.name for m in members if not _ignored(m.name.rsplit("/", 1)[-1])),
                              members[0].name))
        found: dict[str, tarfile.TarInfo] = {}
        for member in members:
            name = _member_name(member, prefix)
            if member.isdir():
                if name not in ("", FILES):
                    raise BundleError(f"{path}: unexpected directory {member.name}")
                continue
            if name in found:
                raise BundleError(f"{path}: {member.name} appears twice")
            found[name] = member
        return found

    def manifest(self) -> tuple[bytes, str | None]:
        member = self.members.get(MANIFEST)
        if member is None:
            raise BundleError(f"{self.path}: no {MANIFEST}: not an edgellm bundle")
        if member.size > MAX_MANIFEST:
            raise BundleError(f"{self.path}: {MANIFEST} is {member.size} bytes; at most {MAX_MANIFEST}")
        data = _data(self.tar, member).read()
        sig = self.members.get(SIGNATURE)
        if sig is not None and sig.size > MAX_SIGNATURE:
            raise BundleError(f"{self.path}: {SIGNATURE} is too large for a minisign signature")
        return data, _data(self.tar, sig).read().decode(errors="replace") if sig is not None else None

    def check(self, manifest: Listing) -> None:
        expected = {f"{FILES}/{f.name}": f for f in manifest.files()}
        for name, member in self.members.items():
            if name in (MANIFEST, SIGNATURE) or _ignored(name.rsplit("/", 1)[-1]):
                continue
            if name not in expected:
                raise BundleError(f"{self.path}: {member.name} is not listed in the manifest")
        for name, f in expected.items():
            found = self.members.get(name)
            if found is None:
                raise BundleError(f"{self.path}: {name} is listed in the manifest but missing")
            if found.size != f.size:
                raise BundleError(f"{self.path}: {name} is {found.size} bytes, the manifest says {f.size}")
        end = max(m.offset_data + m.size for m in self.members.values())
        if end > self.size:
            raise BundleError(f"{self.path}: truncated (the tar ends before its last file does)")

    def open(self, name: str) -> IO[bytes]:
        return _data(self.tar, self.members[f"{FILES}/{name}"])

    def close(self) -> None:
        self.tar.close()
        self.file.close()


class StreamSource:
    """A tar arriving over HTTP: manifest.json first, its signature next, then the files in the
    manifest's order (how `edgellm bundle create --tar` writes them)."""

    seekable: Literal[False] = False

    def __init__(self, stream: Readable, name: str = "upload") -> None:
        self.name = name
        try:  # typeshed asks any fileobj for write, seek and tell too; a stream ("r|") is only read
            self.tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_TarInfo)  # type: ignore[call-overload]
        except tarfile.TarError as e:
            raise BundleError(f"{name}: not an uncompressed tar ({e})") from None
        self._seen = 0
        self._prefix: str | None = None
        self._pending: tarfile.TarInfo | None = None  # read while looking for the signature
        self._pending_name = ""

    def _next(self) -> tuple[str, tarfile.TarInfo] | None:
        while True:
            member = _next(self.tar, self.name, self._seen)
            self._seen += 1
            self.tar.members.clear()  # a stream is read once: keep no list of what went by
            if member is None:
                return None
            if self._prefix is None:
                self._prefix = _prefix(member.name)
            name = _member_name(member, self._prefix)
            if member.isdir():
                if name not in ("", FILES):
                    raise BundleError(f"{self.name}: unexpected directory {member.name}")
                continue
            if _ignored(name.rsplit("/", 1)[-1]):
                continue
            return name, member

    def manifest(self) -> tuple[bytes, str | None]:
        first = self._next()
        if first is None or first[0] != MANIFEST:
            raise BundleError(f"{self.name}: the tar must begin with {MANIFEST}")
        if first[1].size > MAX_MANIFEST:
            raise BundleError(f"{self.name}: {MANIFEST} is {first[1].size} bytes; at most {MAX_MANIFEST}")
        data = _data(self.tar, first[1]).read()
        second = self._next()
        signature = None
        if second is not None and second[0] == SIGNATURE:
            if second[1].size > MAX_SIGNATURE:
                raise BundleError(f"{self.name}: {SIGNATURE} is too large for a minisign signature")
            signature = _data(self.tar, second[1]).read().decode(errors="replace")
        elif second is not None:
            self._pending_name, self._pending = second
        return data, signature

    def check(self, manifest: Listing) -> None:
        """Nothing can be checked ahead in a stream: files() checks each as it comes."""

    def files(self, manifest: Listing) -> Iterator[tuple[str, IO[bytes]]]:
        """Each file of the manifest, in order, with its header checked before its data is read."""
        for f in manifest.files():
            if self._pending is not None:
                name, member = self._pending_name, self._pending
                self._pending = None
            else:
                item = self._next()
                if item is None:
                    raise BundleError(f"{self.name}: {FILES}/{f.name} is listed in the manifest but missing "
                                      "(or the upload ended early)")
                name, member = item
            if name != f"{FILES}/{f.name}":
                raise BundleError(f"{self.name}: expected {FILES}/{f.name} next, found {member.name} (extra, or "
                                  "out of the manifest's order)")
            if member.size != f.size:
                raise BundleError(f"{self.name}: {name} is {member.size} bytes, the manifest says {f.size}")
            yield f.name, _data(self.tar, member)
        extra = self._pending
        if extra is None and (item := self._next()) is not None:
            extra = item[1]
        if extra is not None:
            raise BundleError(f"{self.name}: {extra.name} is not listed in the manifest")

    def close(self) -> None:
        self.tar.close()


def open_source(path: Path) -> DirectorySource | TarSource:
    if path.is_dir():
        return DirectorySource(path)
    if path.is_file():
        return TarSource(path)
    raise BundleError(f"{path}: no such bundle")


def find_bundles(path: Path) -> list[Path]:
    """The bundles at `path`: itself, or (a stick's root) the bundles directly inside it."""
    if path.is_file() or (path / MANIFEST).exists():
        return [path]
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle or directory")
    found = sorted(p for p in path.iterdir() if not _ignored(p.name) and (
        (p.is_dir() and not p.is_symlink() and (p / MANIFEST).exists())
        or (p.is_file() and not p.is_symlink() and p.name.endswith(".tar"))))
    if not found:
        raise BundleError(f"{path}: no bundles here (a bundle is a directory with {MANIFEST}, or a .tar)")
    return found

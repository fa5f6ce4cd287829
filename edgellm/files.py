"""Small files written so that a power cut at any instant leaves the old content or the new."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes | Sequence[bytes | memoryview], mode: int = 0o644) -> None:
    """Temp file beside `path` (created with `mode`, so a secret is never readable by others
    even for an instant), fsync, rename over `path`, fsync the directory. `data` may come in
    parts (a header and a large buffer) so that nothing is copied to join them."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # O_CREAT's mode passes through the umask; on FAT the mount options fix the mode.
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
                os.fchmod(f.fileno(), mode)
            for part in [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

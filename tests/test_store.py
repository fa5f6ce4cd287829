"""The model store: the catalog on disk, the models CLI, and crash safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, edgellm
from tiny_models import write_model

from edgellm.store.registry import Registry

FIELDS = {"id", "aliases", "files", "size", "sha256", "architecture", "quantization", "parameters",
          "context_length", "has_chat_template", "embedding", "defaults", "source", "installed", "license",
          "chat_template", "bundle_created", "signer"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog(state: Path) -> list[dict]:
    return json.loads((state / "models" / "catalog.json").read_text())["models"]


def debris(state: Path) -> list[str]:
    """Files an operation may leave behind only while it runs."""
    root = state / "models"
    return sorted([p.name for p in (root / "tmp").iterdir()] + [p.name for p in root.glob("catalog.json.tmp*")])


def assert_consistent(state: Path) -> list[dict]:
    """Every entry's files are present with the right content, and nothing else is."""
    entries = catalog(state) if (state / "models" / "catalog.json").exists() else []
    blobs = state / "models" / "blobs"
    wanted = set()
    for entry in entries:
        for f in entry["files"]:
            blob = blobs / f"sha256-{f['sha256']}.gguf"
            assert blob.is_file() and blob.stat().st_size == f["size"], entry
            assert sha256(blob) == f["sha256"]
            wanted.add(blob.name)
    assert {p.name for p in blobs.iterdir()} == wanted, "orphaned blobs"
    assert debris(state) == []
    return entries


def test_add_list_show_remove(tmp_path, models):
    state = tmp_path / "state"
    source = models["scripted-chatml"]
    added = edgellm("models", "add", str(source), "--alias", "greeter", "--state-dir", str(state))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("installed scripted-chatml (")

    [entry] = assert_consistent(state)
    assert set(entry) == FIELDS
    assert entry["id"] == "scripted-chatml" and entry["aliases"] == ["greeter"]
    assert entry["sha256"] == sha256(source) and entry["size"] == source.stat().st_size
    assert entry["architecture"] == "llama" and entry["quantization"] == "F16"
    assert entry["has_chat_template"] is True and entry["chat_template"] == "" and entry["embedding"] is False
    assert entry["context_length"] == 65536 and entry["parameters"] > 0
    assert entry["source"] == f"file:{source}"
    assert entry["bundle_created"] == entry["signer"] == ""  # from a file: any bundle may replace it
    # Same filesystem: a hard link, not a copy.
    assert (state / "models" / "blobs" / f"sha256-{entry['sha256']}.gguf").stat().st_ino == source.stat().st_ino

    listed = edgellm("models", "list", "--json", "--state-dir", str(state))
    assert json.loads(listed.stdout) == [entry]
    table = edgellm("models", "list", "--state-dir", str(state)).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "ALIASES", "ARCH"] and table[1].split()[:3] == [
        "scripted-chatml", "greeter", "llama"]
    shown = json.loads(edgellm("models", "show", "greeter", "--json", "--state-dir", str(state)).stdout)
    assert shown["id"] == "scripted-chatml" and shown["paths"][0].endswith(f"sha256-{entry['sha256']}.gguf")

    again = edgellm("models", "add", str(source), "--state-dir", str(state))
    assert again.stdout.startswith("already installed as scripted-chatml") and len(catalog(state)) == 1

    removed = edgellm("models", "remove", "greeter", "--state-dir", str(state))
    assert removed.stdout.strip() == "removed scripted-chatml"
    assert assert_consistent(state) == [] and source.exists()


def test_errors_are_one_line_and_change_nothing(tmp_path, models):
    state = tmp_path / "state"
    assert edgellm("models", "add", str(models["scripted"]), "--alias", "x", "--state-dir", str(state)).returncode == 0
    before = (state / "models" / "catalog.json").read_bytes()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    for args, fragment in [
        (("add", str(not_gguf)), "notes.gguf"),
        (("add", str(tmp_path / "missing.gguf")), "missing.gguf"),
        (("add", str(models["random"]), "--alias", "x"), "already used"),
        (("add", str(models["random"]), "--alias", "../etc"), "alias"),
        (("remove", "nope"), "nope"),
        (("show", "nope"), "nope"),
    ]:
        assert_one_line_error(edgellm("models", *args, "--state-dir", str(state)), fragment, status=1)
        assert (state / "models" / "catalog.json").read_bytes() == before
        assert len(assert_consistent(state)) == 1


def test_a_copy_when_a_hard_link_is_impossible(models):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == models["random"].stat().st_dev:
        pytest.skip("no second filesystem to copy across")
    state = Path(__import__("tempfile").mkdtemp(dir=shm))
    try:
        entry, new = Registry(state).open().add(models["random"])
        blob = entry.paths[0]
        assert new and blob.stat().st_ino != models["random"].stat().st_ino
        assert sha256(blob) == sha256(models["random"])
    finally:
        subprocess.run(["rm", "-rf", str(state)], check=True)


def test_split_models_are_added_together_and_served(tmp_path, server_factory):
    first = write_model(tmp_path / "big.gguf", seed=5, split_max_tensors=8)
    parts = sorted(tmp_path.glob("big-*-of-*.gguf"))
    assert len(parts) == 3 and first == parts[0]
    state = tmp_path / "state"
    added = edgellm("models", "add", str(parts[1]), "--state-dir", str(state))  # any part will do
    assert added.returncode == 0, added.stderr
    [entry] = assert_consistent(state)
    assert entry["id"] == "big" and [f["name"] for f in entry["files"]] == [p.name for p in parts]
    assert [f["sha256"] for f in entry["files"]] == [sha256(p) for p in parts]
    server = server_factory(None, state_dir=state)
    reply = server.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    parts[2].unlink()
    result = edgellm("models", "add", str(parts[0]), "--state-dir", str(tmp_path / "other"))
    assert_one_line_error(result, "big-00003-of-00003.gguf", status=1)


# A child process that does one store operation and SIGKILLs itself just before its k-th
# step that touches the disk; it prints the number of steps when it gets through.
CRASHER = textwrap.dedent("""
    import os, signal, sys
    from edgellm.store.registry import Registry
    state, action, target, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    steps = 0
    def crashing(name):
        real = getattr(os, name)
        def step(*args, **kwargs):
            global steps
            steps += 1
            if steps == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(os, name, step)
    for name in ("link", "replace", "rename", "unlink", "fsync", "mkdir"):
        crashing(name)
    registry = Registry(state)
    if action == "add":
        registry.add(target, alias="fresh")
    else:
        registry.remove(target)
    print(steps)
""")


def crash_at(state: Path, action: str, target: str, k: int) -> int | None:
    """Run the operation, killed before step k; the number of steps if it was not killed."""
    result = subprocess.run([sys.executable, "-c", CRASHER, str(state), action, target, str(k)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode == -9:
        return None
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.parametrize("split", [False, True])
def test_sigkill_at_every_step_of_add_and_remove_loses_nothing(tmp_path, models, split):
    """Kill add (then remove) before each of its disk steps in turn; after a restart the catalog
    is consistent, there is no debris, the model already installed is intact, and the model
    being added (removed) is either fully installed or not at all."""
    new = write_model(tmp_path / "new.gguf", seed=9, split_max_tensors=8 if split else 0)
    keeper = models["scripted"]
    for action in ("add", "remove"):
        k = 1
        while True:
            state = tmp_path / f"{action}-{k}"
            registry = Registry(state).open()
            registry.add(keeper)
            if action == "remove":
                registry.add(new, alias="fresh")
            done = crash_at(state, action, "fresh" if action == "remove" else str(new), k)
            Registry(state).open()  # what the service does at start-up
            entries = assert_consistent(state)
            ids = [e["id"] for e in entries]
            assert ids[0] == "scripted" and entries[0]["sha256"] == sha256(keeper)
            assert ids in (["scripted"], ["scripted", "new"]), ids
            if done is not None:
                assert ids == (["scripted", "new"] if action == "add" else ["scripted"])
                assert k > 3, "the crash points were not reached"
                break
            k += 1
            assert k < 200


def _header(kvs: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + (3).to_bytes(4, "little") + n_tensors.to_bytes(8, "little") + n_kv.to_bytes(8, "little") \
        + kvs + tensors


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return len(key).to_bytes(8, "little") + key.encode() + kind.to_bytes(4, "little") + payload


@pytest.mark.parametrize("name,data", [
    ("huge string", _header(_kv("general.name", 8, (1 << 62).to_bytes(8, "little")), 1)),
    ("huge array", _header(_kv("x", 9, (4).to_bytes(4, "little") + (1 << 61).to_bytes(8, "little")), 1)),
    ("nested arrays", _header(_kv("x", 9, (9).to_bytes(4, "little") + (1).to_bytes(8, "little")
                                  + (9).to_bytes(4, "little") + (1).to_bytes(8, "little")) * 1, 1)),
    ("zero alignment", _header(_kv("general.alignment", 4, (0).to_bytes(4, "little")), 1)),
    ("many layers", _header(_kv("general.architecture", 8, (5).to_bytes(8, "little") + b"llama")
                            + _kv("llama.block_count", 4, (10**8).to_bytes(4, "little")), 2)),
    ("many dimensions", _header(b"", 0, (1).to_bytes(8, "little") + b"t" + (10**6).to_bytes(4, "little"), 1)),
])
def test_hostile_gguf_headers_are_clean_errors(tmp_path, name, data):
    import time

    from edgellm.modelfile import gguf
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + bytes(64))
    started = time.monotonic()
    with pytest.raises(gguf.GGUFError):
        gguf.read(path)
    assert time.monotonic() - started < 1


# --- copying in: read, hash and write in one overlapped pass ---------------------------------------

class _ReadOnly:
    """A stream offering only read(), as an upload's body may."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def read(self, n: int = -1, /) -> bytes:
        return self.stream.read(min(n, 1000) if n > 0 else n)  # and short reads, as a socket gives


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 40 * 4096 + 1])
def test_copy_hashing_writes_and_hashes_exactly_what_it_reads(tmp_path, monkeypatch, size):
    from edgellm.store import registry
    monkeypatch.setattr(registry, "CHUNK", 4096)  # many chunks, so buffers are reused many times over
    data = os.urandom(size)
    for kind in ("file", "read only", "no destination", "limit"):
        out = tmp_path / f"{kind}.out"
        src = _ReadOnly(data) if kind == "read only" else io.BytesIO(data + b"beyond the limit" * (kind == "limit"))
        with open(out, "wb") as dst:
            sha, n = registry.copy_hashing(src, None if kind == "no destination" else dst,  # type: ignore[arg-type]
                                           limit=size if kind == "limit" else None)
        assert (sha, n) == (hashlib.sha256(data).hexdigest(), size), kind
        assert out.read_bytes() == (b"" if kind == "no destination" else data), kind


def test_copy_hashing_starts_writeback_as_it_goes(tmp_path, monkeypatch):
    """The disk writes while the copy goes on, so the final fsync has little left to wait for."""
    from edgellm.store import registry
    monkeypatch.setattr(registry, "CHUNK", 4096)
    monkeypatch.setattr(registry, "WRITEBACK", 3 * 4096)
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(registry, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    with open(tmp_path / "out", "wb") as dst:
        registry.copy_hashing(io.BytesIO(bytes(100 * 4096)), dst)
    assert started[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(started, started[1:], strict=False))
    assert sum(n for _, n in started) >= 97 * 4096


@pytest.mark.parametrize("where", ["read", "write"])
def test_a_failing_read_or_write_ends_the_copy_with_its_error(tmp_path, monkeypatch, where):
    import errno
    import threading

    from edgellm.store import registry
    monkeypatch.setattr(registry, "CHUNK", 4096)

    class Failing(io.BytesIO):
        def readinto(self, b):  # type: ignore[override]
            if where == "read" and self.tell() >= 20 * 4096:
                raise OSError(errno.EIO, "Input/output error")
            return super().readinto(b)

    class Full(io.FileIO):
        def write(self, b):  # type: ignore[override]
            if where == "write" and self.tell() >= 10 * 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    threads = threading.active_count()
    with Full(tmp_path / "out", "w") as dst, pytest.raises(OSError, match="Input/output|No space"):
        registry.copy_hashing(Failing(bytes(100 * 4096)), dst)  # type: ignore[arg-type]
    assert threading.active_count() == threads  # no worker left behind


def test_recovery_syncs_the_blobs_directory_only_after_deleting(tmp_path, monkeypatch, models):
    """Each import and start-up recovers; an fsync of the directory there is a disk flush each time,
    needed only to make deletions last."""
    from edgellm.store import registry
    synced: list[Path] = []
    monkeypatch.setattr(registry, "fsync_dir", synced.append)
    store = Registry(tmp_path / "state").open()
    store.add(models["random"])
    synced.clear()
    store.open()
    assert synced == []  # nothing to delete, nothing to flush
    (store.blobs / f"sha256-{'0' * 64}.gguf").write_bytes(b"an orphan")
    store.open()
    assert synced == [store.blobs] and assert_consistent(tmp_path / "state")

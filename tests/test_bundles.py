"""Signed bundles: the round trip with edgellm's and minisign's signatures, every hostile input
refused with the store unchanged, SIGKILL during imports, a FAT32 stick, the HTTP upload, and
the USB units."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, wait_until
from test_cli import assert_one_line_error, edgellm
from test_store import assert_consistent, catalog, sha256
from tiny_models import write_model

from edgellm.bundles import importer, signing
from edgellm.bundles.reader import open_source
from edgellm.config import Config, ServerConfig
from edgellm.store.registry import Registry

needs_minisign = pytest.mark.skipif(shutil.which("minisign") is None,
                                    reason="minisign is not installed (make test installs it)")


@pytest.fixture
def site(tmp_path, models):
    """A key pair, a state dir that trusts it, a config, and a signed bundle of two models."""
    assert edgellm("keygen", "-o", str(tmp_path / "site")).returncode == 0
    state = tmp_path / "state"
    (state / "trusted-keys").mkdir(parents=True)
    shutil.copy(tmp_path / "site.pub", state / "trusted-keys")
    bundle = tmp_path / "two.edgellm"
    made = edgellm("bundle", "create", str(models["scripted"]), str(models["random"]), "-o", str(bundle),
                   "--key", str(tmp_path / "site.key"), "--license", "apache-2.0", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    return {"dir": tmp_path, "state": state, "bundle": bundle, "key": tmp_path / "site.key",
            "secret": signing.read_secret_key(tmp_path / "site.key")}


def snapshot(state: Path) -> dict[str, str]:
    """Every file under the state dir, by content: 'byte-for-byte unchanged' is equality. But for
    the import history (imports.json), a record of what was tried, refusals too, as a log is."""
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(state.rglob("*")) if p.is_file() and p.name not in (".lock", "imports.json")}


def do_import(path: Path, state: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return edgellm("bundle", "import", str(path), "--state-dir", str(state), *extra, timeout=timeout)


def test_round_trip_signed_by_edgellm(site, server_factory):
    bundle, state = site["bundle"], site["state"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgellm-bundle" and manifest["version"] == 1
    model = manifest["models"][0]
    assert model["id"] == "scripted" and model["license"] == "apache-2.0" and model["architecture"] == "llama"
    assert model["files"] == [{"name": "scripted.gguf", "size": (bundle / "files/scripted.gguf").stat().st_size,
                               "sha256": sha256(bundle / "files/scripted.gguf")}]
    if shutil.which("minisign"):  # edgellm's signature verifies with minisign itself
        checked = subprocess.run(["minisign", "-V", "-p", str(site["dir"] / "site.pub"), "-m",
                                  str(bundle / "manifest.json")], capture_output=True, text=True)
        assert checked.returncode == 0 and "Signature and comment signature verified" in checked.stdout

    verified = edgellm("bundle", "verify", str(bundle), "--state-dir", str(state))
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok {bundle}: scripted, random (key ")
    assert verified.stderr == ""  # no progress bars when stderr is not a terminal

    server = server_factory(None, state_dir=state)  # running before the import: no restart needed
    imported = do_import(bundle, state)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines() == [f"installed scripted from {bundle}", f"installed random from {bundle}"]
    entries = assert_consistent(state)
    assert [e["id"] for e in entries] == ["scripted", "random"] and entries[0]["license"] == "apache-2.0"
    assert entries[0]["source"].startswith("bundle two.edgellm (key ")
    reply = server.post("/v1/completions", {"model": "scripted", "prompt": " Hello", "max_tokens": 4})
    assert reply.json()["choices"][0]["text"] == " world!"

    again = do_import(bundle, state)  # already there: nothing copied, nothing changed
    before = snapshot(state)
    assert again.stdout.splitlines()[0] == f"unchanged scripted from {bundle}" and snapshot(state) == before


# The server's libraries: `edgellm bundle import` (run at every stick insertion, on a Pi) loads none.
SERVER_ONLY = ("llama_cpp", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "zeroconf", "numpy", "psutil",
               "jinja2", "prometheus_client")


def test_the_import_command_loads_only_what_it_needs(site):
    code = textwrap.dedent(f"""
        import sys
        from edgellm.cli import main
        status = main(["bundle", "import", {str(site["bundle"])!r}, "--state-dir", {str(site["state"])!r}])
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_ONLY!r})))
        raise SystemExit(status)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert [e["id"] for e in assert_consistent(site["state"])] == ["scripted", "random"]


@needs_minisign
def test_signed_with_the_minisign_cli(site, models, tmp_path):
    subprocess.run(["minisign", "-G", "-W", "-p", str(tmp_path / "op.pub"), "-s", str(tmp_path / "op.key")],
                   check=True, capture_output=True)
    bundle = tmp_path / "op.edgellm"
    assert edgellm("bundle", "create", str(models["scripted-chatml"]), "-o", str(bundle),
                   "--state-dir", str(site["state"])).returncode == 0
    assert not (bundle / "manifest.json.minisig").exists()
    subprocess.run(["minisign", "-S", "-s", str(tmp_path / "op.key"), "-m", str(bundle / "manifest.json"),
                    "-t", "signed by the operator"], check=True, capture_output=True)
    refused = do_import(bundle, site["state"])  # that key is not trusted yet
    assert refused.returncode == 1 and "not trusted here" in refused.stderr
    shutil.copy(tmp_path / "op.pub", site["state"] / "trusted-keys")
    assert do_import(bundle, site["state"]).stdout.startswith("installed scripted-chatml")
    # edgellm's keys work in minisign too.
    (tmp_path / "note.txt").write_text("hello")
    subprocess.run(["minisign", "-S", "-s", str(site["key"]), "-m", str(tmp_path / "note.txt")], check=True,
                   capture_output=True)
    assert signing.verify(b"hello", (tmp_path / "note.txt.minisig").read_text(),
                          [site["secret"].public_key()], source="note")[0].key_id == site["secret"].key_id


def test_tar_bundles_round_trip(site, models, tmp_path):
    tar = tmp_path / "one.tar"
    assert edgellm("bundle", "create", str(models["embedding"]), "-o", str(tar),
                   "--key", str(site["key"]), "--state-dir", str(site["state"])).returncode == 0
    with tarfile.open(tar) as t:
        assert t.getnames() == ["manifest.json", "manifest.json.minisig", "files/embedding.gguf"]
    assert edgellm("bundle", "verify", str(tar), "--state-dir", str(site["state"])).returncode == 0
    assert do_import(tar, site["state"]).stdout == f"installed embedding from {tar}\n"


def test_a_stick_with_several_bundles_imports_them_all(site, models, tmp_path):
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.move(site["bundle"], stick / "two.edgellm")
    assert edgellm("bundle", "create", str(models["embedding"]), "-o", str(stick / "emb.tar"), "--key",
                   str(site["key"]), "--state-dir", str(site["state"])).returncode == 0
    (stick / "System Volume Information").mkdir()  # what Windows leaves on sticks
    result = do_import(stick, site["state"])
    assert result.returncode == 0, result.stderr
    assert sorted(line.split()[1] for line in result.stdout.splitlines()) == ["embedding", "random", "scripted"]


# --- hostile and damaged input -----------------------------------------------------------------

def resign(bundle: Path, secret: signing.SecretKey) -> None:
    data = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json.minisig").write_text(secret.sign(data, "resigned"))


def edit_manifest(bundle: Path, secret: signing.SecretKey | None, change) -> None:
    doc = json.loads((bundle / "manifest.json").read_text())
    change(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    if secret:
        resign(bundle, secret)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _bad_default_inside(b: Path, s) -> None:
    """The bundled file itself recommends a top_k GGUF writes as a float: signed, and still refused."""
    path = write_model(b / "files/random.gguf", seed=1, sampling={"top_k": 40.0})
    edit_manifest(b, s, lambda d: d["models"][1]["files"][0].update(size=path.stat().st_size, sha256=sha256(path)))


def _other_key(b: Path, s) -> None:
    (b / "manifest.json.minisig").write_text(signing.generate().sign((b / "manifest.json").read_bytes(), "x"))


HOSTILE = {
    "unsigned": (lambda b, s: (b / "manifest.json.minisig").unlink(), "not signed"),
    "unknown key": (_other_key, "not trusted here"),
    "manifest changed after signing": (
        lambda b, s: edit_manifest(b, None, lambda d: d.update(creator="mallory")), "bad signature"),
    "file tampered": (lambda b, s: flip_a_byte(b / "files/random.gguf"), "does not match the manifest's SHA-256"),
    "file truncated": (lambda b, s: os.truncate(b / "files/random.gguf", 1000), "truncated"),
    "file too long": (lambda b, s: append(b / "files/random.gguf", b"x"), "too long"),
    "file missing": (lambda b, s: (b / "files/random.gguf").unlink(), "listed in the manifest but missing"),
    "extra file": (lambda b, s: (b / "files/extra.gguf").write_bytes(b"GGUF"), "not listed in the manifest"),
    "symlinked file": (lambda b, s: ((b / "files/random.gguf").unlink(),
                                     (b / "files/random.gguf").symlink_to("/etc/passwd")), "not a regular file"),
    # Another name for the file, outside the bundle: it could change there after the check.
    "hard-linked file": (lambda b, s: os.link(b / "files/random.gguf", b.parent / "elsewhere.gguf"),
                         "files/random.gguf: a hard link (links are refused)"),
    "symlinked manifest": (lambda b, s: ((b / "manifest.json").rename(b.parent / "m.json"),
                                         (b / "manifest.json").symlink_to(b.parent / "m.json")), "a symbolic link"),
    "created not a time": (lambda b, s: edit_manifest(b, s, lambda d: d.update(created="last tuesday")),
                           "'created' must be an ISO 8601 time"),
    "manifest not JSON": (lambda b, s: ((b / "manifest.json").write_text("{nope"), resign(b, s)), "not JSON"),
    "manifest huge": (lambda b, s: ((b / "manifest.json").write_bytes(b" " * (2 << 20)), resign(b, s)),
                      "at most 1048576"),
    "path traversal": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][1]["files"][0].update(
        name="../../etc/x.gguf")), "not a path"),
    "absolute path": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][1]["files"][0].update(
        name="/etc/x.gguf")), "not a path"),
    "duplicate names": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][1]["files"][0].update(
        name="SCRIPTED.gguf")), "listed twice"),
    "too new": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][0].update(min_edgellm_version="99.0")),
                "needs edgellm 99.0 or newer"),
    # A sampling default becomes every request's: refused here, by type and range, with its key named.
    "float top_k default": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][0].update(
        defaults={"top_k": 40.0})), "defaults: 'top_k' must be an integer"),
    "huge top_k default": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][0].update(
        defaults={"top_k": 2**32 + 5})), "defaults: 'top_k' must be from 0 to 2147483647"),
    "unknown default": (lambda b, s: edit_manifest(b, s, lambda d: d["models"][0].update(
        defaults={"mirostat": 2})), "'mirostat' is not a sampling default"),
    "bad default in the file": (_bad_default_inside, "model random: random.gguf: its sampling default "
                                                     "general.sampling.top_k must be an integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_directories_are_refused_and_change_nothing(site, case):
    state = site["state"]
    keeper = do_import(site["bundle"], state)  # something installed already, which must not change
    assert keeper.returncode == 0
    Registry(state).remove("random")
    before = snapshot(state)
    damage, says = HOSTILE[case]
    damage(site["bundle"], site["secret"])
    result = do_import(site["bundle"], state)
    assert_one_line_error(result, says, status=1)
    assert snapshot(state) == before
    assert [e["id"] for e in assert_consistent(state)] == ["scripted"]


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.fixture
def good_tar(site, tmp_path) -> list[tuple]:
    """The members of a valid signed tar bundle of the random model."""
    tar = tmp_path / "good.tar"
    assert edgellm("bundle", "create", str(site["bundle"] / "files/random.gguf"), "-o", str(tar), "--key",
                   str(site["key"]), "--state-dir", str(site["state"])).returncode == 0
    with tarfile.open(tar) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


TAR_CASES = {
    "absolute path": (lambda ms: ms + [member("/etc/cron.d/x", b"x")], "absolute path"),
    "dot-dot": (lambda ms: ms + [member("files/../../x.gguf", b"x")], "leaves the bundle"),
    "symlink": (lambda ms: ms + [member("files/link.gguf", kind=tarfile.SYMTYPE, link="/etc/passwd")], "a link"),
    "hard link": (lambda ms: ms + [member("files/hard.gguf", kind=tarfile.LNKTYPE, link="files/random.gguf")],
                  "a link"),
    "device": (lambda ms: ms + [member("files/dev.gguf", kind=tarfile.CHRTYPE)], "a device"),
    "fifo": (lambda ms: ms + [member("files/fifo.gguf", kind=tarfile.FIFOTYPE)], "a device, pipe"),
    "duplicate": (lambda ms: ms + [ms[-1]], "appears twice"),
    "extra": (lambda ms: ms + [member("files/extra.gguf", b"GGUF")], "not listed in the manifest"),
    "missing": (lambda ms: ms[:-1], "listed in the manifest but missing"),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_hostile_tars_are_refused_and_change_nothing(site, good_tar, tmp_path, case):
    state = site["state"]
    Registry(state).open()
    before = snapshot(state)
    change, says = TAR_CASES[case]
    tar = tar_with(tmp_path / "bad.tar", change(list(good_tar)))
    assert_one_line_error(do_import(tar, state), says, status=1)
    assert snapshot(state) == before


def test_a_truncated_tar_is_refused(site, good_tar, tmp_path):
    tar = tar_with(tmp_path / "t.tar", good_tar)
    os.truncate(tar, tar.stat().st_size // 2)
    before = snapshot(site["state"])
    result = do_import(tar, site["state"])
    assert result.returncode == 1 and ("truncated" in result.stderr or "damaged" in result.stderr), result.stderr
    assert snapshot(site["state"]) == before


def test_a_model_that_can_never_load_here_is_refused_with_the_numbers(site, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text(f'[server]\nstate_dir = "{site["state"]}"\n[models]\nmemory_budget = "4MiB"\n')
    before = snapshot(site["state"])
    result = edgellm("bundle", "import", str(site["bundle"]), "--config", str(config))
    line = assert_one_line_error(result, "can never load on this box", "even with n_ctx 256", status=1)
    assert "at most 4 MiB" in line
    assert snapshot(site["state"]) == before


def test_too_little_disk_is_refused_before_copying(site, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        (small / "trusted-keys").mkdir()
        shutil.copy(site["dir"] / "site.pub", small / "trusted-keys")
        result = do_import(site["bundle"], small)
        assert_one_line_error(result, "MiB of disk", "are free", status=1)
        assert list((small / "models" / "blobs").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# --- crashes -------------------------------------------------------------------------------------

CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from edgellm.bundles import importer
    from edgellm.bundles.reader import open_source
    from edgellm.config import Config, ServerConfig
    from edgellm.store import registry as store
    state, bundle, k = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    store.CHUNK = 8 << 10  # more, smaller writes: more places to be killed
    steps = 0
    def step():
        global steps
        steps += 1
        if steps == k:
            os.kill(os.getpid(), signal.SIGKILL)
    def crashing(name):
        real = getattr(os, name)
        def wrapper(*args, **kwargs):
            step()
            return real(*args, **kwargs)
        setattr(os, name, wrapper)
    for name in ("link", "replace", "rename", "unlink", "fsync", "mkdir"):
        crashing(name)
    config = Config(server=ServerConfig(state_dir=state))
    importer.import_bundle(open_source(bundle), store.Registry(state), importer.Policy.from_config(config),
                           engine=config.engine, memory_limit=1 << 40, progress=lambda *_: step())
    print(steps)
""")


def test_sigkill_at_many_points_of_an_import_loses_nothing(site, models, tmp_path):
    """Kill the importer at 60 points spread over the copy and the catalog update; after a
    restart each model is fully installed or absent, with no debris, and importing again
    completes the job."""
    split = write_model(tmp_path / "big.gguf", seed=7, split_max_tensors=8)
    bundle = tmp_path / "crash.edgellm"
    assert edgellm("bundle", "create", str(split), str(models["random"]), "-o", str(bundle), "--key",
                   str(site["key"]), "--state-dir", str(site["state"])).returncode == 0
    expected = {m["id"]: [f["sha256"] for f in m["files"]]
                for m in json.loads((bundle / "manifest.json").read_text())["models"]}

    def run(state: Path, k: int) -> int | None:
        result = subprocess.run([sys.executable, "-c", CRASHER, str(state), str(bundle), str(k)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode == -9:
            return None
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    def fresh(name: str) -> Path:
        state = tmp_path / name
        (state / "trusted-keys").mkdir(parents=True)
        shutil.copy(site["dir"] / "site.pub", state / "trusted-keys")
        Registry(state).open().add(models["scripted"])
        return state

    total = run(fresh("count"), 0)
    assert total >= 60
    points = sorted({1 + i * (total - 1) // 59 for i in range(60)})
    assert len(points) >= 50
    for n, k in enumerate(points):
        state = fresh(f"k{k}")
        assert run(state, k) is None, f"step {k} of {total} was not reached"
        Registry(state).open()  # the service's start-up
        entries = {e["id"]: [f["sha256"] for f in e["files"]] for e in assert_consistent(state)}
        assert entries.pop("scripted") == [sha256(models["scripted"])]
        for model_id, shas in entries.items():
            assert shas == expected[model_id]  # fully installed, or (by its absence) not at all
        if n % 10 == 0:  # and it can simply be run again
            assert run(state, 0) is not None
            assert {e["id"] for e in assert_consistent(state)} == {"scripted", *expected}


# --- a FAT32 stick -------------------------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which("mkfs.vfat") and shutil.which("mcopy")),
                    reason="dosfstools and mtools are not installed (make test installs them)")
def test_import_from_a_fat32_image(site, tmp_path):
    image = tmp_path / "stick.img"
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "MODELS", "-C", str(image), str(64 * 1024)], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-s", "-i", str(image), str(site["bundle"]), "::/"], check=True)
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    if subprocess.run(["mount", "-o", "loop,ro,nosuid,nodev,noexec", str(image), str(mounted)],
                      capture_output=True).returncode == 0:
        stick, unmount = mounted, True
    else:  # no vfat driver or loop devices here: read the stick with mtools instead
        subprocess.run(["mcopy", "-s", "-i", str(image), "::/two.edgellm", str(mounted)], check=True)
        stick, unmount = mounted, False
    try:
        result = do_import(stick, site["state"])
        assert result.returncode == 0, result.stderr
        assert {e["id"] for e in assert_consistent(site["state"])} == {"scripted", "random"}
    finally:
        if unmount:
            subprocess.run(["umount", str(mounted)], check=True)


# --- HTTP ----------------------------------------------------------------------------------------

def events(response: httpx.Response) -> list[tuple[str, dict]]:
    found, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[6:])))
    return found


def upload(server, tar: Path, chunk: int = 1 << 16, query: str = "") -> list[tuple[str, dict]]:
    def body():
        with open(tar, "rb") as f:
            while data := f.read(chunk):
                yield data

    with httpx.stream("POST", server.url + "/admin/bundles" + query, content=body(), timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return events(response)


def test_upload_over_http_with_progress(site, server_factory, models, tmp_path):
    tar = tmp_path / "up.tar"
    assert edgellm("bundle", "create", str(models["scripted"]), "-o", str(tar), "--key", str(site["key"]),
                   "--state-dir", str(site["state"])).returncode == 0
    server = server_factory(None, state_dir=site["state"])
    got = upload(server, tar)
    progress = [data for name, data in got if name == "progress"]
    assert progress, got
    assert progress[-1]["done"] == progress[-1]["total"] == models["scripted"].stat().st_size
    assert got[-1] == ("done", {"models": [{"id": "scripted", "status": "installed"}], "warnings": []})
    reply = server.post("/v1/completions", {"model": "scripted", "prompt": " Hello", "max_tokens": 4})
    assert reply.json()["choices"][0]["text"] == " world!"

    # The same checks as the CLI: a tampered upload is an error event and changes nothing.
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    info, data = members[-1]
    members[-1] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    bad = tar_with(tmp_path / "bad.tar", members)
    state = site["state"]
    Registry(state).remove("scripted")
    wait_until(lambda: server.get("/v1/models").json()["data"] == [], 3, message="the removal")
    before = snapshot(state)
    got = upload(server, bad)
    name, error = got[-1]
    assert name == "error" and error["error"]["code"] == "bundle_refused"
    assert "does not match the manifest's SHA-256" in error["error"]["message"]
    assert snapshot(state) == before


def test_uploads_need_the_admin_key(site, server_factory, tmp_path):
    server = server_factory(None, state_dir=site["state"],
                            config='[server]\napi_keys = ["user"]\nadmin_keys = ["boss"]\n', api_key="user")
    refused = httpx.post(server.url + "/admin/bundles", content=b"x", headers={"Authorization": "Bearer user"})
    assert refused.status_code == 401


def _patched(path: Path, index: int, field: slice, value: bytes) -> Path:
    """Overwrite a header field of the index-th 512-byte block and fix its checksum."""
    data = bytearray(path.read_bytes())
    block = index * 512
    data[block + field.start:block + field.stop] = value
    data[block + 148:block + 156] = b" " * 8
    data[block + 148:block + 156] = b"%06o\0 " % sum(data[block:block + 512])
    path.write_bytes(bytes(data))
    return path


def test_tars_built_to_exhaust_the_importer_are_refused_quickly(site, tmp_path):
    """A negative size (tarfile would re-read one header forever) and a huge pax header
    (tarfile would read it whole) are refused at once, before anything is written."""
    before = snapshot(site["state"])
    negative = tar_with(tmp_path / "negative.tar", [member("manifest.json", b"{}")])
    _patched(negative, 0, slice(124, 136), b"\xff" * 12)  # base-256: -1
    pax = tmp_path / "pax.tar"
    info = tarfile.TarInfo("manifest.json")
    info.size = 2
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        info.pax_headers = {"comment": "x" * (128 << 10)}
        tar.addfile(info, io.BytesIO(b"{}"))
    for tar, says in ((negative, "negative size"), (pax, "extended header")):
        assert_one_line_error(do_import(tar, site["state"], timeout=10), says, status=1)  # or TimeoutExpired
    big_signature = site["bundle"] / "manifest.json.minisig"
    big_signature.write_bytes(b"x" * (1 << 20))
    assert_one_line_error(do_import(site["bundle"], site["state"]), "too large for a minisign signature", status=1)
    assert snapshot(site["state"]) == before


def test_names_with_a_trailing_newline_are_refused(site):
    edit_manifest(site["bundle"], site["secret"], lambda d: d["models"][0].update(id="scripted\n"))
    assert_one_line_error(do_import(site["bundle"], site["state"]), "'id'", status=1)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="drops root's file access rights")
def test_a_stick_the_import_cannot_read_is_one_line(tmp_path):
    """The USB import runs as the edgellm user: a mount point it cannot reach is a plain error.
    (Root without CAP_DAC_OVERRIDE meets a directory another user keeps to itself.)"""
    locked = tmp_path / "run"
    (locked / "sda").mkdir(parents=True)
    os.chown(locked, 65534, 65534)
    locked.chmod(0o700)
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                             "edgellm", "bundle", "import", str(locked / "sda"),
                             "--state-dir", str(tmp_path / "state")], capture_output=True, text=True)
    assert_one_line_error(result, f"{locked / 'sda'}: Permission denied", status=1)


# --- versions and signers: what may replace an installed model ---------------------------------

def model_bundle(site, tmp_path: Path, name: str, seed: int, created: str,
                 secret: signing.SecretKey | None = None) -> Path:
    """A bundle of a model `m` (its content made by `seed`), created at `created`, signed by
    `secret` (the site's key by default)."""
    (tmp_path / name).mkdir()
    path = write_model(tmp_path / name / "m.gguf", seed=seed)
    bundle = tmp_path / f"{name}.edgellm"
    made = edgellm("bundle", "create", str(path), "-o", str(bundle), "--key", str(site["key"]),
                   "--state-dir", str(site["state"]))
    assert made.returncode == 0, made.stderr
    edit_manifest(bundle, secret or site["secret"], lambda d: d.update(created=created))
    return bundle


def test_an_older_bundle_does_not_replace_a_newer_one(site, tmp_path):
    state = site["state"]
    v1 = model_bundle(site, tmp_path, "v1", 3, "2026-01-01T00:00:00Z")
    v2 = model_bundle(site, tmp_path, "v2", 4, "2026-02-01T00:00:00Z")
    assert do_import(v2, state).stdout == f"installed m from {v2}\n"
    assert catalog(state)[0]["bundle_created"] == "2026-02-01T00:00:00Z"
    before = snapshot(state)
    assert_one_line_error(do_import(v1, state), f"{v1}: model m: this bundle was created 2026-01-01T00:00:00Z",
                          "the installed one's 2026-02-01T00:00:00Z", "downgrade", "--allow-downgrade", status=1)
    # As old, with other content; and later as text but earlier in time (+02:00): refused as well.
    same = model_bundle(site, tmp_path, "same", 5, "2026-02-01T00:00:00Z")
    zoned = model_bundle(site, tmp_path, "zoned", 6, "2026-02-01T01:30:00+02:00")
    for bundle in (same, zoned):
        assert_one_line_error(do_import(bundle, state), "refused as a downgrade", status=1)
    assert snapshot(state) == before
    assert do_import(v2, state).stdout == f"unchanged m from {v2}\n"  # the same again is no downgrade

    forced = do_import(v1, state, "--allow-downgrade")  # meant
    assert forced.returncode == 0 and forced.stdout == f"replaced m from {v1}\n"
    [entry] = assert_consistent(state)
    assert entry["bundle_created"] == "2026-01-01T00:00:00Z"
    assert entry["files"][0]["sha256"] == sha256(v1 / "files/m.gguf")
    assert do_import(v2, state).stdout == f"replaced m from {v2}\n"  # newer: no flag needed


def test_models_installed_before_versions_and_signers_were_recorded_take_any_bundle(site, tmp_path):
    """A catalog of edgellm before 3 records neither: its models are replaced by any trusted bundle,
    which then records both."""
    state = site["state"]
    v2 = model_bundle(site, tmp_path, "v2", 4, "2026-02-01T00:00:00Z")
    v1 = model_bundle(site, tmp_path, "v1", 3, "2026-01-01T00:00:00Z")
    assert do_import(v2, state).returncode == 0
    doc = json.loads((state / "models/catalog.json").read_text())
    for record in doc["models"]:
        del record["bundle_created"], record["signer"]
    (state / "models/catalog.json").write_text(json.dumps({**doc, "version": 2}))
    assert do_import(v1, state).stdout == f"replaced m from {v1}\n"
    [entry] = assert_consistent(state)
    assert (entry["bundle_created"], entry["signer"]) == ("2026-01-01T00:00:00Z", site["secret"].public_key().id)


def minisign_key(directory: Path, name: str) -> tuple[Path, str]:
    """A key pair made by the minisign CLI; its secret key's path and the key id minisign prints, as
    16 hex digits (minisign's comment drops leading zeros: one key in 16 has one)."""
    public, secret = directory / f"{name}.pub", directory / f"{name}.key"
    subprocess.run(["minisign", "-G", "-W", "-p", str(public), "-s", str(secret)], check=True, capture_output=True)
    return secret, f"{int(public.read_text().splitlines()[0].split()[-1], 16):016X}"


@needs_minisign
def test_a_model_is_pinned_to_the_key_that_signed_it(site, tmp_path):
    """A second trusted key (made and used by the minisign CLI) cannot replace a model installed
    from the first, even with a newer bundle, until the operator removes the model."""
    state = site["state"]
    secret, other = minisign_key(tmp_path, "other")
    shutil.copy(tmp_path / "other.pub", state / "trusted-keys")
    mine = site["secret"].public_key().id
    assert do_import(model_bundle(site, tmp_path, "v1", 3, "2026-01-01T00:00:00Z"), state).returncode == 0
    assert catalog(state)[0]["signer"] == mine

    rogue = model_bundle(site, tmp_path, "rogue", 4, "2026-03-01T00:00:00Z")
    (rogue / "manifest.json.minisig").unlink()
    subprocess.run(["minisign", "-S", "-s", str(secret), "-m", str(rogue / "manifest.json")], check=True,
                   capture_output=True)
    verified = edgellm("bundle", "verify", str(rogue), "--state-dir", str(state))
    assert verified.stdout == f"ok {rogue}: m (key {other})\n"  # a good signature by a trusted key
    before = snapshot(state)
    for extra in ((), ("--allow-downgrade",)):
        assert_one_line_error(do_import(rogue, state, *extra), f"model m was installed from a bundle signed by key "
                              f"{mine}, and this one is key {other}", "edgellm models remove m", status=1)
    unsigned = model_bundle(site, tmp_path, "unsigned", 5, "2026-03-01T00:00:00Z")
    (unsigned / "manifest.json.minisig").unlink()
    config = tmp_path / "dev.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n[bundles]\npolicy = "allow-unsigned"\n')
    assert_one_line_error(edgellm("bundle", "import", str(unsigned), "--config", str(config)),
                          f"signed by key {mine}, and this one is unsigned", status=1)
    assert snapshot(state) == before

    assert edgellm("models", "remove", "m", "--state-dir", str(state)).returncode == 0  # the operator's decision
    assert do_import(rogue, state).stdout == f"installed m from {rogue}\n"
    assert catalog(state)[0]["signer"] == other


def test_a_damaged_trusted_key_is_skipped_with_a_warning(site, models, server_factory, tmp_path):
    state, bundle = site["state"], site["bundle"]
    broken = state / "trusted-keys" / "0-broken.pub"
    broken.write_text("not a key\n")
    (state / "trusted-keys" / "1-folder.pub").mkdir()
    warnings = [f"edgellm: warning: {broken}: not a minisign public key (it must start with 'untrusted comment:'); "
                "skipped (the other trusted keys are used)",
                f"edgellm: warning: {state / 'trusted-keys' / '1-folder.pub'}: cannot read the public key (Is a "
                "directory); skipped (the other trusted keys are used)"]
    verified = edgellm("bundle", "verify", str(bundle), "--state-dir", str(state))
    assert verified.returncode == 0 and verified.stdout.startswith(f"ok {bundle}: scripted, random (key ")
    assert verified.stderr.splitlines() == warnings
    imported = do_import(bundle, state)
    assert imported.returncode == 0 and imported.stderr.splitlines() == warnings
    assert [e["id"] for e in assert_consistent(state)] == ["scripted", "random"]

    tar = tmp_path / "up.tar"
    assert edgellm("bundle", "create", str(models["embedding"]), "-o", str(tar), "--key", str(site["key"]),
                   "--state-dir", str(state)).returncode == 0
    server = server_factory(None, state_dir=state)
    name, done = upload(server, tar)[-1]
    assert name == "done" and done["warnings"] == [w.removeprefix("edgellm: warning: ") for w in warnings]
    assert f"{broken}: not a minisign public key" in server.log()


def test_keys_claiming_the_same_id_are_all_skipped(site, tmp_path):
    """A key id is whatever its maker wrote: another key claiming the site key's id could pass the
    pin of the site's models, so neither is used (the same key twice is one key)."""
    state, site_key = site["state"], site["secret"]
    impostor = signing.generate()
    forged = signing.SecretKey(site_key.key_id, impostor.seed, impostor.public)
    (state / "trusted-keys" / "impostor.pub").write_text(forged.public_key().text())
    shutil.copy(state / "trusted-keys" / "site.pub", state / "trusted-keys" / "site-copy.pub")
    result = do_import(site["bundle"], state)
    assert result.returncode == 1 and "not trusted here (trusted: none)" in result.stderr
    keys = state / "trusted-keys"
    assert result.stderr.splitlines()[0] == (
        f"edgellm: warning: {keys / 'impostor.pub'}, {keys / 'site-copy.pub'}, {keys / 'site.pub'}: different keys "
        f"with the same key id {site_key.public_key().id}; all skipped (the other trusted keys are used)")
    (keys / "impostor.pub").unlink()
    assert do_import(site["bundle"], state).returncode == 0


# A child process that imports the two-model bundle and, as the first file is being copied,
# swaps the second for something else; it prints whether the store's lock was free then, and
# the import's error.
SWAPPER = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    from edgellm.bundles import importer
    from edgellm.bundles.reader import BundleError, open_source
    from edgellm.config import Config, ServerConfig
    from edgellm.store.registry import Registry
    state, bundle, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    victim, aside = bundle / "files/random.gguf", bundle.parent / "aside.gguf"
    registry, seen = Registry(state), {}
    def swap():
        os.rename(victim, aside)
        if how == "symlink to a fifo":
            os.mkfifo(bundle.parent / "fifo")
            victim.symlink_to(bundle.parent / "fifo")
        elif how == "fifo":
            os.mkfifo(victim)
        elif how == "another file":
            shutil.copy(aside, victim)
        elif how == "hard link":
            os.link(aside, victim)
    def progress(stage, name, done, total):
        if not seen:
            with registry.locked(wait=False) as held:
                seen["lock free"] = held
            swap()
    config = Config(server=ServerConfig(state_dir=state))
    try:
        importer.import_bundle(open_source(bundle), registry, importer.Policy.from_config(config),
                               engine=config.engine, memory_limit=1 << 40, progress=progress)
    except BundleError as e:
        seen["error"] = str(e)
    print(json.dumps(seen))
""")


@pytest.mark.parametrize("how,says", [
    ("symlink to a fifo", "files/random.gguf: a symbolic link (links are refused)"),
    ("fifo", "files/random.gguf: not a regular file"),
    ("another file", "files/random.gguf: replaced or changed in size after the bundle was checked"),
    ("hard link", "files/random.gguf: a hard link (links are refused)"),
])
def test_a_file_swapped_after_the_check_is_refused_and_no_lock_is_held_while_reading(site, how, says):
    """The layout is checked, then the files are read: what is put in a file's place in between is
    refused at once (a FIFO used to hang the import in open(), holding the store's lock)."""
    state = site["state"]
    Registry(state).open()
    before = snapshot(state)
    result = subprocess.run([sys.executable, "-c", SWAPPER, str(state), str(site["bundle"]), how],
                            capture_output=True, text=True, timeout=30)  # a hang fails here
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["lock free"] is True  # other imports, `models add` and `remove` go on meanwhile
    assert says in seen["error"]
    assert snapshot(state) == before and assert_consistent(state) == []


def test_listing_models_never_waits_for_a_writer(site):
    """While a writer holds the store's lock (an import committing, `models add` copying a file),
    `models list` and `models show` answer at once from the catalog last committed."""
    state = site["state"]
    assert do_import(site["bundle"], state).returncode == 0
    with Registry(state).locked() as held:
        assert held
        listed = edgellm("models", "list", "--json", "--state-dir", str(state), timeout=20)
        shown = edgellm("models", "show", "random", "--state-dir", str(state), timeout=20)
        table = edgellm("models", "list", "--state-dir", str(state), timeout=20)
    assert [e["id"] for e in json.loads(listed.stdout)] == ["scripted", "random"]
    assert shown.returncode == 0 and shown.stdout.startswith("id:             random\n")
    assert [line.split()[0] for line in table.stdout.splitlines()] == ["ID", "scripted", "random"]


def test_the_usb_import_never_downgrades(site, tmp_path):
    """The USB unit's script runs `edgellm bundle import` with the defaults: run as it does (the
    config on its stdin), an older bundle on a stick is refused."""
    script = (ROOT / "systemd" / "edgellm-usb-import").read_text()
    command = next(line for line in script.splitlines() if "bundle import" in line)
    args = shlex.split(command.split("/opt/edgellm/bin/edgellm", 1)[1].split("<", 1)[0])
    assert args == ["bundle", "import", "--config", "-", "$mountpoint"]
    state = site["state"]
    assert do_import(model_bundle(site, tmp_path, "v2", 4, "2026-02-01T00:00:00Z"), state).returncode == 0
    stick = tmp_path / "stick"
    stick.mkdir()
    model_bundle(site, tmp_path, "v1", 3, "2026-01-01T00:00:00Z").rename(stick / "v1.edgellm")
    before = snapshot(state)
    result = subprocess.run([sys.executable, "-m", "edgellm", *args[:-1], str(stick)], capture_output=True, text=True,
                            input=f'[server]\nstate_dir = "{state}"\n', timeout=60)
    assert_one_line_error(result, "refused as a downgrade", status=1)
    assert snapshot(state) == before


def as_tar(bundle: Path) -> Path:
    """A directory bundle as the tar an upload sends: manifest, signature, then the files."""
    tar = bundle.with_suffix(".tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for name in ("manifest.json", "manifest.json.minisig", *[f"files/{f['name']}" for m in json.loads(
                (bundle / "manifest.json").read_text())["models"] for f in m["files"]]):
            t.add(bundle / name, name)
    return tar


def test_an_upload_downgrades_only_when_asked(site, server_factory, tmp_path):
    state = site["state"]
    v1 = as_tar(model_bundle(site, tmp_path, "v1", 3, "2026-01-01T00:00:00Z"))
    v2 = as_tar(model_bundle(site, tmp_path, "v2", 4, "2026-02-01T00:00:00Z"))
    server = server_factory(None, state_dir=state)
    assert upload(server, v2)[-1] == ("done", {"models": [{"id": "m", "status": "installed"}], "warnings": []})
    before = snapshot(state)
    name, error = upload(server, v1)[-1]
    assert name == "error" and error["error"]["code"] == "bundle_refused"
    assert "this bundle was created 2026-01-01T00:00:00Z" in error["error"]["message"]
    assert "?allow_downgrade=true" in error["error"]["message"]
    assert snapshot(state) == before
    replaced = upload(server, v1, query="?allow_downgrade=true")[-1]
    assert replaced == ("done", {"models": [{"id": "m", "status": "replaced"}], "warnings": []})
    bad = httpx.post(server.url + "/admin/bundles?allow_downgrade=maybe", content=b"x")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "allow_downgrade"


def test_a_recovery_meanwhile_leaves_a_running_import_alone(site):
    """An import copies without the store's lock, so another process may clear debris meanwhile (a
    service starting, `models add`): the running import's staging directory is not debris."""
    state = site["state"]
    registry = Registry(state)
    seen: list[tuple[list[str], list[str]]] = []

    def progress(stage: str, name: str, done: int, total: int) -> None:
        if not seen:
            staging = sorted(p.name for p in registry.tmp.iterdir())
            Registry(state).open()  # what a starting service does
            seen.append((staging, sorted(p.name for p in registry.tmp.iterdir())))

    config = Config(server=ServerConfig(state_dir=str(state)))
    source = open_source(site["bundle"])
    try:
        outcomes = importer.import_bundle(source, registry, importer.Policy.from_config(config), engine=config.engine,
                                          memory_limit=1 << 40, progress=progress)
    finally:
        source.close()
    assert [o.status for o in outcomes] == ["installed", "installed"]
    staging, after = seen[0]
    assert len(staging) == 2 and staging[1] == staging[0] + ".lock" and after == staging
    assert [e["id"] for e in assert_consistent(state)] == ["scripted", "random"]

"""Importing a bundle against `sha256sum` and `cp` of the same file on the same disk.

    python tools/bench/bundle_import.py [--model M.gguf] [--rounds 5] [--dir DIR] [--cache warm|cold|both]
                                        [--bytecode cached|none]

Makes a signed bundle of the model, then each round (in alternating order)
times `sha256sum` of the model file, `cp` of it, `cp` followed by `sync` of
the copy, `edgellm --version` (the interpreter and the CLI's imports: the
start-up every command pays) and `edgellm bundle import` (the whole command:
start-up, signature, checks, the GGUF header walk, one pass of copy + SHA-256,
fsync, rename, catalog) into a fresh state dir, with `sync` before every run.
With a warm page cache the source is read from memory (the comparison is the
cost of hashing, writing and flushing); with a cold one the cache is dropped
before every run (root), so the source and the interpreter's own files come
from the disk, as from a USB stick. Python's bytecode is cached, as installed
(pip and the image compile it), in a scratch PYTHONPYCACHEPREFIX that a first
run fills, whatever PYTHONDONTWRITEBYTECODE says; --bytecode none compiles
every module at every start instead. Prints the medians and, for each cache
state, whether the import meets its target:

    import <= 1.2 x max(sha256sum, cp + sync) + 0.3 s

the cost of the two things an import must do (hash the file, and copy it
durably), overlapped, plus the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EDGELLM = [sys.executable, "-m", "edgellm"]  # run in ROOT, so this tree's edgellm is the one measured
SLACK, STARTUP = 1.2, 0.3  # the target: SLACK x max(sha256sum, cp + sync) + STARTUP


ENV = dict(os.environ)


def timed(cmd: list[str], cold: bool) -> float:
    subprocess.run(["sync"], check=True)  # no writeback of an earlier run in this one's time
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    return time.perf_counter() - started


def bytecode(work: Path, mode: str) -> None:
    """Where the commands' bytecode comes from: a cache as installed, or compiled at every start."""
    if mode == "cached":
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")  # filled by the set-up's commands
    else:
        ENV["PYTHONDONTWRITEBYTECODE"] = "1"
        ENV.pop("PYTHONPYCACHEPREFIX", None)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(work: Path, bundle: Path, source: Path, rounds: int, cold: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"sha256sum": [], "cp": [], "cp + sync": [], "edgellm --version": [],
                                     "edgellm bundle import": []}
    for i in range(rounds):
        state = work / f"state{i}"
        (state / "trusted-keys").mkdir(parents=True)
        shutil.copy(work / "bench.pub", state / "trusted-keys")
        runs = [
            ("sha256sum", ["sha256sum", str(source)]),
            ("cp", ["cp", str(source), str(work / f"copy{i}")]),
            ("cp + sync", ["sh", "-c", f'cp "{source}" "{work}/synced{i}" && sync "{work}/synced{i}"']),
            ("edgellm --version", [*EDGELLM, "--version"]),
            ("edgellm bundle import", [*EDGELLM, "bundle", "import", str(bundle), "--state-dir", str(state)]),
        ]
        for name, cmd in runs if i % 2 == 0 else reversed(runs):
            times[name].append(timed(cmd, cold))
        for leftover in (work / f"copy{i}", work / f"synced{i}"):
            leftover.unlink()
        shutil.rmtree(state)
    return times


def report(times: dict[str, list[float]], size: int, rounds: int, cold: bool, loads: tuple[str, str]) -> bool:
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["cp + sync"]
    print(f"{'cold' if cold else 'warm'} page cache, {rounds} rounds, load average {loads[0]} before, "
          f"{loads[1]} after")
    print(f"{'':24}{'median s':>10}{'MB/s':>8}{'vs cp+sync':>12}   all runs")
    for name, median in medians.items():
        rate = f"{size / median / 1e6:8.0f}" if "version" not in name else f"{'':8}"
        print(f"{name:24}{median:10.3f}{rate}{median / base:12.2f}   "
              + " ".join(f"{x:.3f}" for x in times[name]))
    target = SLACK * max(medians["sha256sum"], medians["cp + sync"]) + STARTUP
    met = medians["edgellm bundle import"] <= target
    print(f"target {SLACK} x max(sha256sum, cp + sync) + {STARTUP} s = {target:.3f} s: import "
          f"{medians['edgellm bundle import']:.3f} s, {'met' if met else 'NOT met'}")
    print()
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm/demo/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=ROOT / ".edgellm/bench-import",
                        help="a scratch directory on the disk to measure (default: under .edgellm)")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both",
                        help="cold drops the page cache before every run (root): the source is read from the "
                             "disk, as from a USB stick (default: both, warm first)")
    parser.add_argument("--cold", action="store_const", const="cold", dest="cache", help="the same as --cache cold")
    parser.add_argument("--bytecode", choices=("cached", "none"), default="cached",
                        help="cached: as installed (default); none: every module compiled at every start")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        bytecode(work, args.bytecode)
        subprocess.run([*EDGELLM, "keygen", "-o", str(work / "bench")], check=True, stdout=subprocess.DEVNULL,
                       cwd=ROOT, env=ENV)
        bundle = work / "bench.edgellm"
        subprocess.run([*EDGELLM, "bundle", "create", str(args.model), "-o", str(bundle), "--key",
                        str(work / "bench.key"), "--state-dir", str(work / "unused")], check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT, env=ENV)
        (work / "warm-up" / "trusted-keys").mkdir(parents=True)  # and the import's own modules compiled
        shutil.copy(work / "bench.pub", work / "warm-up" / "trusted-keys")
        subprocess.run([*EDGELLM, "bundle", "import", str(bundle), "--state-dir", str(work / "warm-up")], check=True,
                       stdout=subprocess.DEVNULL, cwd=ROOT, env=ENV)
        shutil.rmtree(work / "warm-up")
        source = bundle / "files" / args.model.name
        size = source.stat().st_size
        print(f"{args.model.name}: {size / 1e6:.1f} MB, edgellm from {ROOT}, bytecode {args.bytecode}, "
              f"scratch {work}")
        print()
        for cold in {"warm": [False], "cold": [True], "both": [False, True]}[args.cache]:
            before = load()
            times = measure(work, bundle, source, args.rounds, cold)
            report(times, size, args.rounds, cold, (before, load()))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

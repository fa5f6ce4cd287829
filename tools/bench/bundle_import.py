"""Importing a bundle against `cp` of the same file on the same disk.

    python tools/bench/bundle_import.py [--model M.gguf] [--rounds 5] [--dir DIR]

Makes a signed bundle of the model, then each round (in alternating order)
times `cp` of the model file, `cp` followed by `sync` of that file, and
`edgellm bundle import` (the whole command: start-up, signature, checks, one
pass of copy + SHA-256, fsync, rename, catalog) into a fresh state dir. The
page cache is warm for all of them (the source is read from memory: the
comparison is the cost of writing and hashing), or with --cold dropped before
each run (the source is read from the disk, as from a USB stick). Prints the
medians and the ratios; the target is import <= 1.2x cp.
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
EDGELLM = [sys.executable, "-m", "edgellm"]


def timed(cmd: list[str], cold: bool) -> float:
    subprocess.run(["sync"], check=True)  # no writeback of an earlier run in this one's time
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm/demo/gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=ROOT / ".edgellm/bench-import",
                        help="a scratch directory on the disk to measure (default: under .edgellm)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before every run (root): the source is read from the disk, "
                             "as from a USB stick")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        subprocess.run([*EDGELLM, "keygen", "-o", str(work / "bench")], check=True, stdout=subprocess.DEVNULL)
        bundle = work / "bench.edgellm"
        subprocess.run([*EDGELLM, "bundle", "create", str(args.model), "-o", str(bundle), "--key",
                        str(work / "bench.key"), "--state-dir", str(work / "unused")], check=True,
                       stdout=subprocess.DEVNULL)
        source = bundle / "files" / args.model.name
        times: dict[str, list[float]] = {"cp": [], "cp + sync": [], "edgellm bundle import": []}
        for i in range(args.rounds):
            state = work / f"state{i}"
            (state / "trusted-keys").mkdir(parents=True)
            shutil.copy(work / "bench.pub", state / "trusted-keys")
            runs = [
                ("cp", ["cp", str(source), str(work / f"copy{i}")]),
                ("cp + sync", ["sh", "-c", f'cp "{source}" "{work}/synced{i}" && sync "{work}/synced{i}"']),
                ("edgellm bundle import", [*EDGELLM, "bundle", "import", str(bundle), "--state-dir", str(state)]),
            ]
            for name, cmd in runs if i % 2 == 0 else reversed(runs):
                times[name].append(timed(cmd, args.cold))
            for leftover in (work / f"copy{i}", work / f"synced{i}"):
                leftover.unlink()
            shutil.rmtree(state)
        size = source.stat().st_size
        base = statistics.median(times["cp"])
        print(f"{args.model.name}: {size / 1e6:.1f} MB, {args.rounds} rounds, {'cold' if args.cold else 'warm'} "
              f"page cache, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'':24}{'median s':>10}{'MB/s':>8}{'vs cp':>8}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:24}{median:10.3f}{size / median / 1e6:8.0f}{median / base:8.2f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

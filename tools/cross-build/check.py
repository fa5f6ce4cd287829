"""Check built wheels: ELF for the wheel's architecture, only the expected NEEDED libraries, and
the highest GLIBC / GLIBCXX symbol versions they need (which decide the OSes that can run them).

    python3 check.py WHEEL...
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EXPECTED = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1", "libdl.so.2",
            "libpthread.so.0", "libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0", "libllama.so.0",
            "libvulkan.so.1", "libggml-vulkan.so.0", "ld-linux-aarch64.so.1", "ld-linux-x86-64.so.2"}


def highest(symbols: str, prefix: str) -> str:
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(rf"\b{prefix}_([0-9.]+)\b", symbols)}
    return f"{prefix}_{'.'.join(map(str, max(versions)))}" if versions else "-"


def check(wheel: Path) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        print(wheel.name)
        aarch64 = wheel.name.endswith("linux_aarch64.whl")
        tools = "aarch64-linux-gnu-" if aarch64 else ""
        machine = "AArch64" if aarch64 else "X86-64"
        for lib in sorted(Path(tmp, "llama_cpp", "lib").glob("*.so")):
            header = subprocess.run([f"{tools}readelf", "-h", str(lib)], capture_output=True,
                                    text=True).stdout
            dynamic = subprocess.run([f"{tools}readelf", "-d", str(lib)], capture_output=True,
                                     text=True).stdout
            symbols = subprocess.run([f"{tools}objdump", "-T", str(lib)], capture_output=True,
                                     text=True).stdout
            needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
            unexpected = sorted(set(needed) - EXPECTED)
            right = machine in header
            ok &= right and not unexpected
            print(f"  {lib.name:18} {machine if right else 'WRONG MACHINE'}  {highest(symbols, 'GLIBC'):12} "
                  f"{highest(symbols, 'GLIBCXX'):16} {highest(symbols, 'CXXABI'):12} "
                  f"{'unexpected NEEDED: ' + ', '.join(unexpected) if unexpected else 'NEEDED ok'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if all([check(Path(w)) for w in sys.argv[1:]]) else 1)

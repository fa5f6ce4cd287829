"""Pack a built llama-cpp-python into a wheel (linux_aarch64, or linux_x86_64 for x86 variants).

    python3 make_wheel.py SRC OUT VARIANT

llama-cpp-python loads its libraries with ctypes from llama_cpp/lib, so the
wheel is the package's Python files plus those .so files. Zip files hold no
symlinks: each library goes in under its plain name (what ctypes asks for) and
its SONAME (what the dynamic linker looks for, through RPATH $ORIGIN).
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "0.3.36"
REQUIRES = ["typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]


def soname(path: Path) -> str | None:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"\(SONAME\)\s+Library soname: \[(.+?)\]", out)
    return match[1] if match else None


def main() -> None:
    src, out, variant = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    platform = "linux_x86_64" if variant.startswith("x86_64") else "linux_aarch64"
    version = f"{VERSION}+{variant.replace('x86_64', 'x86.64').replace('-', '.')}"
    files: dict[str, bytes] = {}
    for path in sorted((src / "llama_cpp").rglob("*")):
        if path.is_file() and not path.is_symlink() and "lib" not in path.relative_to(src / "llama_cpp").parts[:1]:
            if path.suffix in (".py", ".typed") or path.name == "py.typed":
                files[str(path.relative_to(src))] = path.read_bytes()
    libs = src / "llama_cpp" / "lib"
    for path in sorted(libs.iterdir()):
        if path.is_symlink() or not path.is_file() or ".so" not in path.name:
            continue
        data = path.read_bytes()
        plain = re.sub(r"\.so(\.\d+)*$", ".so", path.name)
        for name in {plain, soname(path) or plain}:
            files[f"llama_cpp/lib/{name}"] = data
    dist = f"llama_cpp_python-{version}.dist-info"
    files[f"{dist}/METADATA"] = ("Metadata-Version: 2.1\nName: llama_cpp_python\n"
                                 f"Version: {version}\nSummary: llama-cpp-python {VERSION}, cross-built for "
                                 f"{platform} ({variant}) by edgellm's tools/cross-build\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in REQUIRES)).encode()
    files[f"{dist}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: edgellm tools/cross-build\nRoot-Is-Purelib: false\n"
                              f"Tag: py3-none-{platform}\n").encode()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"llama_cpp_python-{version}-py3-none-{platform}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") or ".so." in name else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    print(wheel)


if __name__ == "__main__":
    main()

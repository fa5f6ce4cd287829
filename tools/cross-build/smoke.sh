#!/bin/sh
# tools/cross-build/smoke.sh [WHEEL_DIR]: run each linux_aarch64 wheel under qemu-user, on an
# emulated Cortex-A72 (Pi 4), Cortex-A76 (Pi 5) and "max" (every feature qemu has), with an
# arm64 Python unpacked from Debian's packages into a sysroot (no binfmt_misc needed).
# Needs root once, for `dpkg --add-architecture arm64` and an apt-get update.
set -eu
wheels="$(realpath "${1:-dist}")"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${EDGELLM_CROSS_CACHE:-$HOME/.cache/edgellm-cross}/smoke"
python="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$cache/debs" "$cache/wheels"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64 && apt-get update -q >/dev/null
fi
if [ ! -x "$cache/sysroot/usr/bin/python3.11" ] || [ ! -e "$cache/sysroot/usr/lib/aarch64-linux-gnu/libvulkan.so.1" ]; then
    (cd "$cache/debs" && apt-get download -q python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
        libpython3.11-stdlib:arm64 libc6:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libgcc-s1:arm64 \
        libstdc++6:arm64 libgomp1:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 \
        libuuid1:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libcrypt1:arm64 libnsl2:arm64 \
        libtirpc3:arm64 libdb5.3:arm64 libgdbm6:arm64 libvulkan1:arm64 2>/dev/null)
    for deb in "$cache"/debs/*.deb; do dpkg -x "$deb" "$cache/sysroot"; done
fi
if [ ! -d "$cache/pylib/numpy" ]; then
    "$python" -m pip download -q --only-binary=:all: --platform manylinux_2_17_aarch64 --python-version 3.11 \
        --implementation cp -d "$cache/wheels" numpy typing-extensions diskcache jinja2 markupsafe
    for w in "$cache"/wheels/*.whl; do "$python" -m zipfile -e "$w" "$cache/pylib"; done
fi
model="$cache/tiny.gguf"
"$python" -c "import sys; sys.path.insert(0, '$root/tests'); from pathlib import Path; \
from tiny_models import write_model; write_model(Path('$model'), seed=1)"
for wheel in "$wheels"/llama_cpp_python-*linux_aarch64.whl; do
    variant="$(basename "$wheel" | sed 's/.*+\([^-]*\)-py3.*/\1/')"
    rm -rf "$cache/site-$variant" && "$python" -m zipfile -e "$wheel" "$cache/site-$variant"
    for cpu in cortex-a72 cortex-a76 max; do
        printf '%s on %s: ' "$variant" "$cpu"
        if ! qemu-aarch64-static -L "$cache/sysroot" -cpu "$cpu" \
                -E PYTHONPATH="$cache/site-$variant:$cache/pylib" -E PYTHONDONTWRITEBYTECODE=1 \
                "$cache/sysroot/usr/bin/python3.11" "$here/smoke.py" "$model" "$cpu" 2>"$cache/err"; then
            echo "failed: $(grep -o -m1 'Illegal instruction\|Error.*' "$cache/err" | head -n1)"
        fi
    done
done

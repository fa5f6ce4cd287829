#!/bin/sh
# tools/cross-build/build.sh VARIANT [OUT]: a wheel of llama-cpp-python 0.3.36 for one CPU
# level, built from the pinned sdist (its SHA-256 is checked). aarch64 variants are
# cross-compiled with Debian's gcc-aarch64-linux-gnu:
#   armv8.0          NEON only: Raspberry Pi 4 (Cortex-A72), RK3399, any aarch64 board
#   armv8.2          + dotprod + fp16: Raspberry Pi 5 (Cortex-A76), Jetson Orin (A78AE), RK3588
#   armv8.0-vulkan   armv8.0 + the Vulkan backend (boards with a Vulkan driver llama.cpp supports)
# and x86-64 ones natively:
#   x86_64           AVX2 + FMA + F16C (x86-64-v3: Haswell and later), portable across PCs
#   x86_64-vulkan    x86_64 + the Vulkan backend
set -eu
variant="${1:?usage: build.sh armv8.0|armv8.2|armv8.0-vulkan|x86_64|x86_64-vulkan [OUT]}"
out="$(realpath -m "${2:-dist}")"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${EDGELLM_CROSS_CACHE:-$HOME/.cache/edgellm-cross}"
sdist="llama_cpp_python-0.3.36.tar.gz"
sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
toolchain="-DCMAKE_TOOLCHAIN_FILE=$here/aarch64-linux-gnu.cmake"
vulkan=OFF
case "$variant" in
    armv8.0) cpu="-DGGML_CPU_ARM_ARCH=armv8-a" ;;
    armv8.2) cpu="-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;;
    armv8.0-vulkan)  # Debian multiarch: libvulkan-dev:arm64; the headers and glslc are the host's
        cpu="-DGGML_CPU_ARM_ARCH=armv8-a -DSPIRV-Headers_DIR=/usr/share/cmake/SPIRV-Headers \
-DVulkan_INCLUDE_DIR=/usr/include -DVulkan_LIBRARY=/usr/lib/aarch64-linux-gnu/libvulkan.so \
-DVulkan_GLSLC_EXECUTABLE=/usr/bin/glslc"
        vulkan=ON ;;
    x86_64) cpu="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"; toolchain="" ;;
    x86_64-vulkan) cpu="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"; toolchain=""; vulkan=ON ;;
    *) echo "build.sh: unknown variant $variant" >&2; exit 2 ;;
esac
mkdir -p "$cache" "$out"
if [ ! -f "$cache/$sdist" ]; then
    python3 -m pip download --no-deps --no-binary :all: -d "$cache" llama-cpp-python==0.3.36 >/dev/null
fi
echo "$sha256  $cache/$sdist" | sha256sum -c --quiet - || {
    echo "build.sh: $cache/$sdist is not the pinned sdist (SHA-256 differs); refusing it" >&2; exit 1; }
src="$cache/src-$variant"
rm -rf "$src" && mkdir -p "$src" && tar -xzf "$cache/$sdist" -C "$src" --strip-components=1
if [ "$vulkan" = ON ] && ! grep -qs "LayerSettingEXT" /usr/include/vulkan/vulkan.hpp; then
    python3 "$here/old_vulkan_headers.py" "$src"  # Debian 12's headers predate VK_EXT_layer_settings
fi
build="$cache/build-$variant"
rm -rf "$build"
# shellcheck disable=SC2086  # $toolchain and $cpu are lists of flags
cmake -S "$src" -B "$build" $toolchain $cpu -DGGML_VULKAN="$vulkan" \
    -DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DSKBUILD_PLATLIB_DIR="$build/platlib" >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
cmake --install "$build" >/dev/null
python3 "$here/make_wheel.py" "$src" "$out" "$variant"

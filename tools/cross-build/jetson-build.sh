#!/bin/sh
# tools/cross-build/jetson-build.sh: build llama-cpp-python 0.3.36 with CUDA on the Jetson
# itself (JetPack 6 for Orin, JetPack 5 for Xavier), into dist/. The aarch64 CUDA toolkit is
# not available on an x86-64 Debian machine, so this cannot be cross-compiled here.
#   Orin (Nano, NX, AGX):  sm_87      Xavier (NX, AGX): sm_72
set -eu
arch="${CUDA_ARCH:-}"
if [ -z "$arch" ]; then
    case "$(tr -d '\0' < /proc/device-tree/compatible 2>/dev/null)" in
        *tegra234*) arch=87 ;;
        *tegra194*) arch=72 ;;
        *) echo "jetson-build.sh: not an Orin or Xavier; set CUDA_ARCH (87 Orin, 72 Xavier)" >&2; exit 2 ;;
    esac
fi
command -v nvcc >/dev/null || PATH="/usr/local/cuda/bin:$PATH"
command -v nvcc >/dev/null || { echo "jetson-build.sh: nvcc not found: install JetPack's CUDA toolkit" >&2; exit 1; }
sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
mkdir -p dist build-jetson
python3 -m pip download --no-deps --no-binary :all: -d build-jetson llama-cpp-python==0.3.36
echo "$sha256  build-jetson/llama_cpp_python-0.3.36.tar.gz" | sha256sum -c --quiet -
# Orin and Xavier have dotprod (ARMv8.2): the CPU part of the build uses it as well.
CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=OFF \
-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DLLAVA_BUILD=OFF" \
    python3 -m pip wheel --no-deps -w dist build-jetson/llama_cpp_python-0.3.36.tar.gz
echo "built $(ls dist/llama_cpp_python-0.3.36-*.whl); install it, then \`edgellm doctor\` should plan CUDA"

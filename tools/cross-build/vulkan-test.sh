#!/bin/sh
# tools/cross-build/vulkan-test.sh WHEEL: install an x86_64-vulkan wheel into a scratch virtual
# environment with edgellm, and show on Mesa's lavapipe (mesa-vulkan-drivers) that the hardware
# probe sees the Vulkan device and that edgellm generates tokens on it.
set -eu
wheel="$(realpath "$1")"
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${EDGELLM_CROSS_CACHE:-$HOME/.cache/edgellm-cross}/vulkan-venv"
rm -rf "$venv" && python3 -m venv "$venv"
"$venv/bin/pip" install -q "$wheel"
"$venv/bin/pip" install -q -e "$root" gguf httpx pytest  # tests/ helpers write the model
work="$(mktemp -d)"
# lavapipe is a CPU-type Vulkan device, which ggml skips unless it is named explicitly.
export GGML_VK_VISIBLE_DEVICES=0
"$venv/bin/python" -c "import sys; sys.path.insert(0, '$root/tests'); from pathlib import Path; \
from tiny_models import write_model; from conftest import SCRIPT; write_model(Path('$work/tiny.gguf'), script=SCRIPT)"
echo "--- edgellm doctor (the build's devices and the plan, forced to Vulkan)"
printf '[engine]\nbackend = "vulkan"\n' > "$work/edgellm.toml"
"$venv/bin/edgellm" doctor --config "$work/edgellm.toml" | sed -n '/llama.cpp build/,$p'
"$venv/bin/edgellm" serve --model "$work/tiny.gguf" --config "$work/edgellm.toml" --port 18999 \
    --state-dir "$work/state" > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:18999/health >/dev/null && break
    sleep 0.2
done
echo "--- a completion"
curl -s http://127.0.0.1:18999/v1/completions -H 'Content-Type: application/json' \
    -d '{"prompt": " Hello", "max_tokens": 4, "temperature": 0}'
echo
kill "$pid"; wait "$pid" || true
grep -E "ready in|backend" "$work/serve.log"
grep -q "on vulkan" "$work/serve.log" && echo "OK: generated on Vulkan (lavapipe)"

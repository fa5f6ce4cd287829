"""Run under qemu-aarch64 by smoke.sh: load a tiny GGUF with the cross-built llama-cpp-python,
generate greedily, and print what ran as one JSON line (so runs on several CPUs can be compared)."""

import json
import sys

import llama_cpp

model_path, label = sys.argv[1], sys.argv[2]
llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_threads=2, verbose=False, seed=1)
out = llm.create_completion("Hello world", max_tokens=16, temperature=0.0)
info = llama_cpp.llama_print_system_info().decode()
print(json.dumps({"cpu": label, "compiled": info.strip(), "text": out["choices"][0]["text"],
                  "tokens": out["usage"]["completion_tokens"]}))

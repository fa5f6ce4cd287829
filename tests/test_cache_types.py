"""Quantized KV cache types: configured, estimated, shown, and refused clearly where llama.cpp cannot."""

from __future__ import annotations

import openai
import pytest

from edgellm.config import ConfigError, from_dict
from edgellm.modelfile import gguf, memory


def test_a_quantized_v_cache_without_flash_attention_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cache_type_v = 'q8_0' needs flash attention"):
        from_dict({"engine": {"cache_type_v": "q8_0", "flash_attn": "off"}}, "edgellm.toml")
    with pytest.raises(ConfigError, match="must be one of f16, q8_0, q4_0"):
        from_dict({"engine": {"cache_type_k": "q5_1"}}, "edgellm.toml")
    from_dict({"engine": {"cache_type_k": "q4_0", "flash_attn": "off"}}, "edgellm.toml")  # K alone may be


def test_the_estimate_counts_quantized_blocks(demo_model):
    headers = [gguf.read(demo_model)]
    f16 = memory.kv_bytes_per_cell(headers)
    assert memory.kv_bytes_per_cell(headers, "q8_0", "q8_0") == f16 * 34 // 64  # 32 values in 34 bytes
    assert memory.kv_bytes_per_cell(headers, "q4_0", "q4_0") == f16 * 18 // 64
    assert memory.kv_bytes_per_cell(headers, "q8_0", "f16") == f16 * 34 // 64 // 2 + f16 // 2


def test_a_q8_0_cache_serves_and_is_shown(server_factory, demo_model):
    server = server_factory(demo_model, config='[engine]\ncache_type_k = "q8_0"\ncache_type_v = "q8_0"\n')
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    reply = client.completions.create(model="gemma-3-270m-q4_k_m", prompt="The capital of France is",
                                      max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    (model,) = server.get("/admin/models").json()["data"]
    headers = [gguf.read(demo_model)]
    assert model["kv_cache"] == {"type_k": "q8_0", "type_v": "q8_0",
                                 "estimate_bytes": 4096 * memory.kv_bytes_per_cell(headers, "q8_0", "q8_0")}


def test_a_cache_type_the_model_cannot_take_fails_its_load_with_llama_cpps_reason(server_factory, models):
    # The tiny model's heads are 16 wide: q8_0's 32-value blocks do not divide them.
    server = server_factory(models["random"], config='[engine]\ncache_type_k = "q8_0"\n', wait_ready=False)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(model="random", prompt="tick", max_tokens=2)
    assert error.value.status_code == 503
    assert "does not divide n_embd_head_k=16" in error.value.message

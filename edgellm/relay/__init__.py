"""The relay to an upstream OpenAI-compatible tier (vLLM): missing models, overflow, fallback."""

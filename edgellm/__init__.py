"""edgellm: an OpenAI-compatible LLM server for small boards, built on llama.cpp."""

__version__ = "0.1.0"

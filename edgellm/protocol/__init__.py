"""The OpenAI API's request and response shapes, independent of HTTP and of llama.cpp."""

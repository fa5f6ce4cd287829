"""What a GGUF file says about itself, read without loading it: its header (gguf.py), the
memory a load will take (memory.py) and the sampling defaults it recommends (defaults.py).
A leaf: every package may use it, and it uses nothing of edgellm's but errors and units."""

"""The engine: the generation service every front end calls (service.py), the models it knows and
loads (catalog, budget, loader, pool), and everything that touches llama.cpp: the runner thread
and its scheduler, sampling and grammars, text and chat templates. docs/architecture.md maps it."""

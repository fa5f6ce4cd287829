"""Everything that touches llama.cpp: models, the scheduler thread, sampling, text and chat templates."""

"""OpenAI wire schemas (pydantic) and nothing else."""

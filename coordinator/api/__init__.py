"""The HTTP API: OpenAI- and Ollama-compatible routes over the scheduler (``create_app``)."""

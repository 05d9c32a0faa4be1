"""The project's CPU model server: the local engine behind vLLM's OpenAI-compatible API.

A process of its own (``python -m services.llm.server``) with its own settings
(``config.py``); the worker reaches it through ``services.llm.openai_engine``
exactly as it reaches vLLM on a GPU.
"""

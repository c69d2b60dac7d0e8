"""tsedge: compiled long-context LLM inference with TokenSelect KV-cache selection."""

__version__ = "0.1.0"

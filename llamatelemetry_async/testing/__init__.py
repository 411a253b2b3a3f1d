"""Helpers that tests (ours and users') can reuse: a tiny real GGUF model for llama-server."""

from llamatelemetry_async.testing._tiny_model import TINY_MODEL_NAME, write_tiny_model

__all__ = ["TINY_MODEL_NAME", "write_tiny_model"]

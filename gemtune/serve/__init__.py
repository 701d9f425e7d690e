"""Serving: one base, many adapters (embedded engine or vLLM) behind an OpenAI-compatible gateway."""

"""gemtune: from raw domain examples to a shipped, gated, served Gemma LoRA adapter."""

__version__ = "0.1.0"

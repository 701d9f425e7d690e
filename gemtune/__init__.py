"""gemtune: from raw domain examples to a shipped, gated, served Gemma LoRA adapter."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes tries to download an optional CPU kernel from a hub at import and warns when it cannot; gemtune
# never needs it (its fallback kernel is used), so the warning is noise on every command.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

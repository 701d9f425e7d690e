"""Token lengths of full training examples, counted with the base model's own tokenizer and chat template.

The length that matters for `max_tokens` is the rendered conversation (turn markers, BOS and end-of-turn
included), exactly what training will feed the model. Rendering is cheap string work; tokenizing 100k rows with
a 262k-vocabulary tokenizer is not, so texts are encoded in batches by the Rust tokenizer without offsets,
attention masks or Python token lists — only the lengths are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from gemtune.base.families import Family, family_for
from gemtune.errors import UserError


def _family_of_dir(path: Path) -> Family:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the base's config.json: {e}", file=str(path / "config.json"), field="base") from None
    mt = cfg.get("model_type") or (cfg.get("text_config") or {}).get("model_type")
    return family_for(str(mt))


class TokenCounter:
    """Counts rendered-example lengths for one base (its tokenizer and template family)."""

    def __init__(self, base: str):
        from gemtune.base.loader import load_tokenizer
        from gemtune.base.provision import pull

        self.base = base
        # verify=False: only tokenizer.json and config.json are read here; the weights are verified by whoever loads them.
        self.path = Path(pull(base, verify=False))
        self.family = _family_of_dir(self.path)
        try:
            self.tokenizer = load_tokenizer(self.path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer of {base!r}: {e}", field="base") from None
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)

    def render_text(self, messages: list[dict]) -> str:
        """The string `gemtune.base.templates.render` tokenizes, without tokenizing it."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        from gemtune.base.templates import _own_parts

        return "".join(p for p, _ in _own_parts(messages, self.family, False, tok.bos_token or "<bos>"))

    def count(self, conversations: Sequence[list[dict]], *, batch: int = 4096,
              progress: Optional[Callable[[int], None]] = None) -> list[int]:
        """Token count of each rendered conversation (same as `len(render(...).input_ids)`)."""
        out: list[int] = []
        for i in range(0, len(conversations), batch):
            texts = [self.render_text(m) for m in conversations[i:i + batch]]
            out.extend(self._lengths(texts))
            if progress:
                progress(len(texts))
        return out

    def _lengths(self, texts: list[str]) -> list[int]:
        b = self._backend
        if b is not None:
            enc = b.encode_batch_fast(texts, add_special_tokens=False) if hasattr(b, "encode_batch_fast") \
                else b.encode_batch(texts, add_special_tokens=False)
            return [len(e) for e in enc]
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(x) for x in ids]

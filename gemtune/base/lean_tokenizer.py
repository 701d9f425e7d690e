"""A tokenizer's decoding, and a fixed set of prompts, without the tokenizer: what a per-checkpoint eval keeps while
training runs.

Gemma's 262k-entry tokenizer holds ~0.32 GiB resident (its BPE merges, vocabulary maps and added-token matcher) and
peaks at ~0.47 GiB while it loads. The trainer frees its own once the examples are encoded; a checkpoint eval that
loaded another would add ~25 % to a 270M run's peak RSS. So the eval takes what it needs from the trainer's tokenizer
before that is freed (`LeanTokenizer.from_tokenizer`):

- the suite's prompts, rendered once (`prompt_ids`);
- the id -> token-string table, the ids of special tokens, and the tokenizer's own decoder object (a
  `tokenizers.decoders` pipeline of a few KB), so `decode` runs exactly what `tokenizer.decode` runs: the Rust
  tokenizer's decode (ids to token strings through the added vocabulary then the model, unknown ids dropped, special
  tokens dropped when asked, then the decoder; tokens joined by spaces when there is none) and transformers'
  clean-up of spaces when that tokenizer would apply it;
- the pad, eos, unk and stop ids, and (for `eval.constrained`) xgrammar's tokenizer info.

It answers the few tokenizer calls the eval path makes (`decode`, `convert_tokens_to_ids`, the special ids) and
nothing else: anything that would need the real tokenizer fails loudly instead of loading one.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional


def prompt_key(messages: list, tools: Optional[list]) -> str:
    return json.dumps([messages, tools or None], sort_keys=True, ensure_ascii=False)


class LeanTokenizer:
    """See the module docstring. Build it with `from_tokenizer`."""

    def __init__(self, pieces: list[Optional[str]], special_ids: set[int], decoder, *, pad_token_id: Optional[int],
                 eos_token_id: Optional[int], unk_token_id: Optional[int], clean_up, prompts: dict[str, list[int]],
                 xgrammar_info: Any = None, name: str = ""):
        self.pieces, self.special_ids, self.decoder = pieces, special_ids, decoder
        self.pad_token_id, self.eos_token_id, self.unk_token_id = pad_token_id, eos_token_id, unk_token_id
        self.clean_up = clean_up  # transformers' clean-up function, or None when decode would not apply it
        self.prompts = prompts
        self.xgrammar_info = xgrammar_info
        self.name_or_path = name

    @classmethod
    def from_tokenizer(cls, tok, family, conversations: Iterable[tuple[list, Optional[list]]] = (), *,
                       grammar_vocab: Optional[int] = None) -> "LeanTokenizer":
        """From a loaded Hugging Face fast tokenizer: `conversations` ((messages, tools) pairs) are rendered now as
        generation prompts for `family`; `grammar_vocab` (the logits' width) also keeps xgrammar's tokenizer info."""
        from gemtune.base.templates import render_prompt, stop_token_ids

        prompts = {}
        for messages, tools in conversations:
            key = prompt_key(messages, tools)
            if key not in prompts:
                prompts[key] = list(render_prompt(messages, tok, family, tools=tools or None).input_ids)
        backend = tok.backend_tokenizer
        pieces = tok.convert_ids_to_tokens(list(range(backend.get_vocab_size(with_added_tokens=True))))
        special = {int(i) for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
        info = None
        if grammar_vocab is not None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=grammar_vocab,
                                                      stop_token_ids=stop_token_ids(tok, family))
        return cls(pieces, special, backend.decoder, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   unk_token_id=tok.unk_token_id, clean_up=_clean_up_of(tok), prompts=prompts, xgrammar_info=info,
                   name=str(getattr(tok, "name_or_path", "")))

    def __len__(self) -> int:
        return len(self.pieces)

    def prompt_ids(self, messages: list, tools: Optional[list] = None) -> list[int]:
        try:
            return list(self.prompts[prompt_key(messages, tools)])
        except KeyError:
            raise RuntimeError("this prompt was not rendered before the tokenizer was freed: a LeanTokenizer only "
                               "holds the prompts it was built with") from None

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        try:
            return self.pieces.index(token)  # a few lookups per eval (stop tokens): a scan beats a 262k-entry dict
        except ValueError:
            return self.unk_token_id

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if isinstance(ids, int):
            ids = [ids]
        n = len(self.pieces)
        tokens = [self.pieces[i] for i in (int(t) for t in ids)
                  if 0 <= i < n and self.pieces[i] is not None and not (skip_special_tokens and i in self.special_ids)]
        text = " ".join(tokens) if self.decoder is None else self.decoder.decode(tokens)
        return self.clean_up(text) if self.clean_up is not None else text

    def __call__(self, *a, **k):
        raise RuntimeError("a LeanTokenizer cannot encode text: it holds a fixed set of rendered prompts")

    def apply_chat_template(self, *a, **k):
        raise RuntimeError("a LeanTokenizer cannot render a chat template: it holds a fixed set of rendered prompts")


def _clean_up_of(tok):
    """transformers' clean-up of tokenization spaces, when `tok.decode` would apply it (never for a BPE model
    unless forced), as a function of the text; else None."""
    if not getattr(tok, "clean_up_tokenization_spaces", False):
        return None
    if (type(tok.backend_tokenizer.model).__name__ == "BPE"
            and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)):
        return None
    fn = type(tok).clean_up_tokenization
    return lambda text: fn(None, text)

"""Token lengths of full training examples, counted with the base model's own tokenizer and chat template.

The length that matters for `max_tokens` is the rendered conversation (turn markers, BOS and end-of-turn
included), exactly what training will feed the model. Rendering is cheap string work; tokenizing 100k rows with a
262k-vocabulary tokenizer is not, so only what is needed is counted, in batches, by the Rust tokenizer:

- the limit: with a byte-level BPE whose normaliser never lengthens text (Gemma's only maps " " to "▁"), every
  token covers at least one byte, so a rendered example of at most `max_tokens` UTF-8 bytes cannot be too long.
  Every row that could exceed the limit is counted exactly; the others need no count to pass.
- the statistics (histogram, percentiles) come from a uniform sample of rows (all rows for datasets up to
  `COUNT_ALL_UP_TO`), plus the longest rows by bytes so the reported maximum is the real one in practice; the report
  says when it is sampled.

When the base directory has a plain `tokenizer.json` and no chat template, the Rust tokenizer is loaded from it
directly (a second, not the ten `AutoTokenizer` takes on the 262k vocabulary); it is the same tokenizer
(`test_real_tokenizer_counts_equal_render` checks counts against `templates.render`). Otherwise the tokenizer comes
from `gemtune.base.loader.load_tokenizer` and its own chat template renders the text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from gemtune.base.families import Family, family_for
from gemtune.errors import UserError

STATS_SAMPLE = 10_000  # rows counted for statistics on large datasets
COUNT_ALL_UP_TO = 20_000  # below this every row is counted (a second or two)
LONGEST = 256  # longest rows by bytes always counted, so the reported maximum is exact in practice
SLACK = 16  # tokens a tokenizer may add that cover no input byte (a prepended "▁" and the like)


def _family_of_dir(path: Path) -> Family:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the base's config.json: {e}", file=str(path / "config.json"), field="base") from None
    mt = cfg.get("model_type") or (cfg.get("text_config") or {}).get("model_type")
    return family_for(str(mt))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _content(tok) -> Optional[str]:
    return tok.get("content") if isinstance(tok, dict) else tok


class TokenCounter:
    """Counts rendered-example lengths for one base (its tokenizer and template family)."""

    def __init__(self, base: str):
        from gemtune.base.provision import pull

        self.base = base
        # verify=False: only tokenizer files and config.json are read here; whoever loads the weights verifies them.
        self.path = Path(pull(base, verify=False))
        self.family = _family_of_dir(self.path)
        tok_cfg = _json(self.path / "tokenizer_config.json")
        has_template = bool(tok_cfg.get("chat_template")) or (self.path / "chat_template.jinja").is_file() \
            or (self.path / "chat_template.json").is_file()
        self.tokenizer = None
        if (self.path / "tokenizer.json").is_file() and not has_template:
            from tokenizers import Tokenizer

            try:
                self._backend = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            except Exception as e:  # a corrupt tokenizer.json raises a plain Exception from Rust
                raise UserError(f"cannot load tokenizer.json of {base!r}: {e}", field="base") from None
            self.bos = _content(tok_cfg.get("bos_token")) or "<bos>"
            self.special_tokens = [t["content"] for t in _json(self.path / "tokenizer.json").get("added_tokens", [])
                                   if t.get("special")]
        else:
            from gemtune.base.loader import load_tokenizer

            try:
                self.tokenizer = load_tokenizer(self.path)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of {base!r}: {e}", field="base") from None
            self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self.bos = self.tokenizer.bos_token or "<bos>"
            self.special_tokens = [str(t.content) for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()
                                   if getattr(t, "special", False)]
        self.bytes_bound = self._bytes_bound_holds()

    def _bytes_bound_holds(self) -> bool:
        """True when every token provably covers at least one input byte: no normaliser step may lengthen text.

        Gemma's normaliser is a single Replace(" " -> "▁"); anything else (NFKD, Prepend, multi-character
        replacements) makes the shortcut unsafe and every row is counted.
        """
        b = self._backend
        if b is None:
            return False
        norm = b.normalizer
        if norm is None:
            return True
        steps = getattr(norm, "normalizers", None) or [norm]
        for step in steps:
            r = repr(step)
            m = re.fullmatch(r'Replace\(pattern=String\("(.+?)"\), content="(.*?)"\)', r, flags=re.S)
            if not m or len(m.group(2)) > len(m.group(1)):
                return False
        return True

    def render_text(self, messages: list[dict], tools: Optional[list] = None) -> str:
        """The string `gemtune.base.templates.render` tokenizes, without tokenizing it (tool use included: a Gemma 3
        tokenizer's own template knows no tools, so gemtune's convention renders those conversations)."""
        from gemtune.base.templates import hf_messages, render_text, uses_tools

        tool_use = uses_tools(messages, tools)
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) \
                and not (tool_use and self.family.name == "gemma3"):
            if tool_use:
                return self.tokenizer.apply_chat_template(hf_messages(messages), tools=tools or None, tokenize=False,
                                                          add_generation_prompt=False)
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return render_text(messages, self.family, bos=self.bos, tools=tools)

    def count(self, conversations: Sequence[list[dict]], *, batch: int = 4096,
              progress: Optional[Callable[[int], None]] = None) -> list[int]:
        """Exact token count of every rendered conversation (same as `len(render(...).input_ids)`)."""
        texts = [self.render_text(m) for m in conversations]
        return self._count_texts(texts, batch, progress)

    def limit_and_sample(self, conversations: Sequence[list[dict]], max_tokens: int, *,
                         progress: Optional[Callable[[int], None]] = None) -> tuple[list[Optional[int]], set[int]]:
        """(lengths, sample): lengths[i] is exact for every row that could exceed `max_tokens` and for the rows
        counted for statistics, None for rows that provably fit; `sample` holds the uniform statistics sample."""
        texts = [self.render_text(m) for m in conversations]
        n = len(texts)
        if n <= COUNT_ALL_UP_TO or not self.bytes_bound:
            return self._count_texts(texts, 4096, progress), set(range(n))
        nbytes = [len(t.encode("utf-8")) for t in texts]
        stride = n / STATS_SAMPLE
        sample = {int(k * stride) for k in range(STATS_SAMPLE)}
        longest = sorted(range(n), key=nbytes.__getitem__)[-LONGEST:]
        need = sorted(sample | set(longest) | {i for i, b in enumerate(nbytes) if b + SLACK > max_tokens})
        counted = self._count_texts([texts[i] for i in need], 4096, progress)
        lengths: list[Optional[int]] = [None] * n
        for i, c in zip(need, counted):
            lengths[i] = c
        if progress:
            progress(n - len(need))
        return lengths, sample

    def _count_texts(self, texts: list[str], batch: int, progress) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            out.extend(self._lengths(chunk))
            if progress:
                progress(len(chunk))
        return out

    def _lengths(self, texts: list[str]) -> list[int]:
        b = self._backend
        if b is not None:
            enc = b.encode_batch_fast(texts, add_special_tokens=False) if hasattr(b, "encode_batch_fast") \
                else b.encode_batch(texts, add_special_tokens=False)
            return [len(e) for e in enc]
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(x) for x in ids]

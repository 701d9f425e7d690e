"""LeanTokenizer: the checkpoint eval's decode table and pre-rendered prompts decode and render exactly as the
tokenizer they were taken from (issue #14: the eval must not load Gemma's 262k tokenizer a second time)."""

from __future__ import annotations

import random

import pytest

from gemtune.base.families import family_for
from gemtune.base.lean_tokenizer import LeanTokenizer
from gemtune.base.templates import render_prompt, stop_token_ids

CONVERSATIONS = [
    ([{"role": "user", "content": "Where is my card?"}], None),
    ([{"role": "system", "content": "Route the ticket."}, {"role": "user", "content": "refund please"}], None),
    ([{"role": "user", "content": "weather in Oslo?"}],
     [{"type": "function", "function": {"name": "weather", "description": "forecast",
                                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                       "required": ["city"]}}}]),
]


def _check_same(tok, fam, id_lists):
    lean = LeanTokenizer.from_tokenizer(tok, fam, CONVERSATIONS)
    for messages, tools in CONVERSATIONS:
        assert lean.prompt_ids(messages, tools) == list(render_prompt(messages, tok, fam, tools=tools).input_ids)
    for ids in id_lists:
        for skip in (True, False):
            assert lean.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert stop_token_ids(lean, fam) == stop_token_ids(tok, fam)
    assert (lean.pad_token_id, lean.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    with pytest.raises(RuntimeError, match="not rendered"):
        lean.prompt_ids([{"role": "user", "content": "never rendered"}])
    return lean


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_lean_tokenizer_decodes_and_renders_as_the_tiny_tokenizer(family):
    from gemtune.base.tiny import tiny_tokenizer

    tok = tiny_tokenizer(family)
    fam = family_for({"gemma3": "gemma3_text", "gemma4": "gemma4_text"}[family])
    rng = random.Random(0)
    n = len(tok)
    id_lists = [[rng.randrange(n) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    id_lists += [tok.encode("hello, world\n  two  spaces", add_special_tokens=True), [], [n + 5, 1, n * 3]]
    _check_same(tok, fam, id_lists)


@pytest.mark.slow
def test_lean_tokenizer_decodes_as_gemma_and_holds_a_fraction_of_its_memory(real_base):
    """On the real 262k tokenizer: random ids (byte-fallback pieces, specials, unused tokens) and encoded text with
    emoji, CJK, newlines and runs of spaces decode the same; once the tokenizer is freed, what the lean table keeps
    resident is under half of what the tokenizer held (measured: 269 MiB against 60 MiB). RSS is read after
    `malloc_trim(0)`, so freed heap is counted as given back whatever the allocator would keep."""
    import ctypes
    import gc
    import sys

    from gemtune.base.loader import load_tokenizer

    libc = ctypes.CDLL("libc.so.6")

    def rss_mib() -> float:
        gc.collect()
        libc.malloc_trim(0)
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    start = rss_mib()
    tok = load_tokenizer(real_base)
    with_tok = rss_mib()
    fam = family_for("gemma3_text")
    rng = random.Random(1)
    texts = ["Mañana 🚚 déjà vu — 東京 ok?\n\n  x", "{\"a\": [1, 2]}\t<b>tag</b>", "naïve café\r\n" * 3]
    id_lists = [tok.encode(t, add_special_tokens=True) for t in texts]
    id_lists += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))] for _ in range(300)]
    id_lists += [[rng.randrange(256) + 238 for _ in range(12)] for _ in range(50)]  # runs of byte-fallback pieces
    lean = _check_same(tok, fam, id_lists)
    del tok
    lean_only = rss_mib()
    table = sys.getsizeof(lean.pieces) + sum(sys.getsizeof(p) for p in lean.pieces if p is not None)
    print(f"RSS {start:.0f} MiB; with the tokenizer {with_tok:.0f}; with only its lean table {lean_only:.0f} "
          f"(table {table / 2**20:.1f} MiB)")
    assert len(lean) >= 262144
    assert table < 40 * 2**20
    assert lean_only - start < 0.5 * (with_tok - start), (start, with_tok, lean_only)

"""Template rendering against hand-checked token ids, and assistant spans that include end-of-turn."""

import pytest

from gemtune.base.families import GEMMA3_TEXT, GEMMA4_TEXT
from gemtune.base.templates import render, render_prompt, stop_token_ids, validate_messages
from gemtune.base.tiny import char_id, tiny_tokenizer
from gemtune.errors import UserError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "no"},
]


def ids(s: str) -> list[int]:
    return [char_id(c) for c in s]


def test_gemma3_ids_and_spans():
    tok = tiny_tokenizer("gemma3")
    r = render(CONV, tok, GEMMA3_TEXT)
    SOT, EOT, NL = 105, 106, char_id("\n")
    expected = (
        [2, SOT] + ids("user\nBe brief.\n\nhi") + [EOT, NL]
        + [SOT] + ids("model\nok") + [EOT, NL]
        + [SOT] + ids("user\nand?") + [EOT, NL]
        + [SOT] + ids("model\nno") + [EOT, NL]
    )
    assert r.input_ids == expected
    # each assistant span is exactly its content plus the end-of-turn token
    assert [r.input_ids[s:e] for s, e in r.assistant_spans] == [ids("ok") + [EOT], ids("no") + [EOT]]
    mask = r.assistant_mask()
    assert sum(mask) == 6
    assert r.text.startswith("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n")


def test_gemma4_ids_and_spans():
    tok = tiny_tokenizer("gemma4")
    r = render(CONV, tok, GEMMA4_TEXT)
    T0, T1, NL = 105, 106, char_id("\n")
    expected = (
        [2, T0] + ids("system\nBe brief.") + [T1, NL]
        + [T0] + ids("user\nhi") + [T1, NL]
        + [T0] + ids("model\nok") + [T1, NL]
        + [T0] + ids("user\nand?") + [T1, NL]
        + [T0] + ids("model\nno") + [T1, NL]
    )
    assert r.input_ids == expected
    assert [r.input_ids[s:e] for s, e in r.assistant_spans] == [ids("ok") + [T1], ids("no") + [T1]]
    assert r.text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\nok<turn|>\n"
        "<|turn>user\nand?<turn|>\n<|turn>model\nno<turn|>\n"
    )


@pytest.mark.parametrize("family,fam", [("gemma3", GEMMA3_TEXT), ("gemma4", GEMMA4_TEXT)])
def test_generation_prompt_and_stop_tokens(family, fam):
    tok = tiny_tokenizer(family)
    p = render_prompt(CONV[:2], tok, fam)
    header = "<start_of_turn>model\n" if family == "gemma3" else "<|turn>model\n"
    assert p.text.endswith(header)
    assert p.assistant_spans == []
    assert p.input_ids[-len(ids("model\n")) - 1:] == [105] + ids("model\n")
    assert stop_token_ids(tok, fam) == [106, 1]


def test_tokenizer_own_template_is_used_and_spans_found():
    tok = tiny_tokenizer("gemma4")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
    )
    r = render(CONV, tok, GEMMA4_TEXT)
    assert [r.input_ids[s:e] for s, e in r.assistant_spans] == [ids("ok") + [106], ids("no") + [106]]
    r2 = render(CONV, tok, GEMMA4_TEXT, use_tokenizer_template=False)
    assert r.input_ids == r2.input_ids


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
        [{"role": "bot", "content": "a"}],
        [{"role": "user", "content": "a"}],
    ],
)
def test_validate_messages_rejects(bad):
    with pytest.raises(UserError, match="messages"):
        validate_messages(bad)


@pytest.mark.slow
def test_real_gemma3_tokenizer_reference_ids(real_base):
    from gemtune.base.loader import load_tokenizer

    tok = load_tokenizer(real_base)
    r = render([{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
               tok, GEMMA3_TEXT)
    # <bos> <start_of_turn> user \n What is the capital of France ? <end_of_turn> \n <start_of_turn> model \n ...
    assert r.input_ids[:16] == [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]
    s, e = r.assistant_spans[0]
    assert r.input_ids[e - 1] == 106 and e == len(r.input_ids) - 1
    assert tok.decode(r.input_ids[s:e - 1]) == "Paris."

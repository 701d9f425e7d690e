"""Chat templates for Gemma 3 and Gemma 4, with the token span of every assistant turn.

Training must put exactly the assistant tokens and their end-of-turn token inside the loss, so rendering returns
the spans as well as the ids. Ids are produced by tokenizing the fully rendered string once (special tokens as the
tokenizer defines them); spans come from character offsets, so they agree with the ids by construction.

When the tokenizer carries its own chat template we render with it (a real Gemma 4 checkpoint's template stays
authoritative) and locate the assistant turns in its output; when it has none (the embedded GGUF) we use ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemtune.base.families import Family
from gemtune.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end), end-of-turn inside
    char_spans: list[tuple[int, int]] = field(default_factory=list)

    def assistant_mask(self) -> list[bool]:
        mask = [False] * len(self.input_ids)
        for s, e in self.assistant_spans:
            for i in range(s, e):
                mask[i] = True
        return mask


def validate_messages(messages, *, require_final_assistant: bool = True, where: str = "") -> None:
    """Roles known, contents strings, optional system first, then user/assistant alternating."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}messages must be a non-empty list", field="messages")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}messages[{i}].role must be one of {ROLES}", field="messages")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}messages[{i}].content must be a string", field="messages")
        roles.append(m["role"])
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        raise UserError(f"{where}messages has only a system turn", field="messages")
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            raise UserError(f"{where}messages must alternate user/assistant after an optional system turn", field="messages")
    if require_final_assistant and body[-1] != "assistant":
        raise UserError(f"{where}the last turn must be the assistant's", field="messages")


def _render_gemma3(messages, add_generation_prompt: bool, bos: str):
    """Gemma 3: no system role; the system text prefixes the first user turn, separated by a blank line."""
    parts: list[tuple[str, bool]] = [(bos, False)]
    prefix = ""
    msgs = messages
    if msgs and msgs[0]["role"] == "system":
        prefix = msgs[0]["content"].strip() + "\n\n"
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        role = "model" if m["role"] == "assistant" else m["role"]
        content = (prefix if i == 0 else "") + m["content"].strip()
        parts.append((f"<start_of_turn>{role}\n", False))
        if m["role"] == "assistant":
            parts.append((content + "<end_of_turn>", True))
            parts.append(("\n", False))
        else:
            parts.append((content + "<end_of_turn>\n", False))
    if add_generation_prompt:
        parts.append(("<start_of_turn>model\n", False))
    return parts


def _render_gemma4(messages, add_generation_prompt: bool, bos: str):
    """Gemma 4: native system role, turns delimited by `<|turn>` and `<turn|>`."""
    parts: list[tuple[str, bool]] = [(bos, False)]
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        parts.append((f"<|turn>{role}\n", False))
        if m["role"] == "assistant":
            parts.append((m["content"].strip() + "<turn|>", True))
            parts.append(("\n", False))
        else:
            parts.append((m["content"].strip() + "<turn|>\n", False))
    if add_generation_prompt:
        parts.append(("<|turn>model\n", False))
    return parts


def _own_parts(messages, family: Family, add_generation_prompt: bool, bos: str):
    if family.name == "gemma3":
        return _render_gemma3(messages, add_generation_prompt, bos)
    return _render_gemma4(messages, add_generation_prompt, bos)


def render_text(messages, family: Family, *, bos: str = "<bos>", add_generation_prompt: bool = False) -> str:
    """The conversation as text in gemtune's own Gemma template (no tokenizer needed: fast token counting)."""
    return "".join(p for p, _ in _own_parts(messages, family, add_generation_prompt, bos))


def _tokenizer_template_spans(tokenizer, messages, family: Family, add_generation_prompt: bool):
    """Render with the tokenizer's own template; find each assistant content + end-of-turn in order."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        needle = m["content"].strip()
        start = text.find(needle, cursor)
        eot = text.find(family.end_of_turn, start + len(needle)) if start >= 0 else -1
        if start < 0 or eot < 0:
            raise UserError("the tokenizer's chat template does not reproduce an assistant turn verbatim", field="chat_template")
        end = eot + len(family.end_of_turn)
        spans.append((start, end))
        cursor = end
    return text, spans


def render(messages, tokenizer, family: Family, *, add_generation_prompt: bool = False, use_tokenizer_template: bool = True) -> Rendered:
    """Render and tokenize a conversation; `assistant_spans` covers each assistant turn including end-of-turn."""
    bos = tokenizer.bos_token or "<bos>"
    if use_tokenizer_template and getattr(tokenizer, "chat_template", None):
        text, char_spans = _tokenizer_template_spans(tokenizer, messages, family, add_generation_prompt)
    else:
        parts = _own_parts(messages, family, add_generation_prompt, bos)
        text, char_spans, pos = "", [], 0
        for piece, is_assistant in parts:
            if is_assistant:
                char_spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    tok_spans = []
    for cs, ce in char_spans:
        idx = [i for i, (s, e) in enumerate(offsets) if e > cs and s < ce]
        if idx:
            tok_spans.append((idx[0], idx[-1] + 1))
    return Rendered(text=text, input_ids=list(ids), assistant_spans=tok_spans, char_spans=char_spans)


def render_prompt(messages, tokenizer, family: Family, use_tokenizer_template: bool = True) -> Rendered:
    """The prompt for generation: everything up to and including the model-turn header."""
    return render(messages, tokenizer, family, add_generation_prompt=True, use_tokenizer_template=use_tokenizer_template)


def end_of_turn_id(tokenizer, family: Family) -> int:
    tid = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    if tid is None or tid == tokenizer.unk_token_id:
        raise UserError(f"tokenizer has no {family.end_of_turn} token; is this a {family.name} tokenizer?", field="tokenizer")
    return tid


def stop_token_ids(tokenizer, family: Family) -> list[int]:
    ids = [end_of_turn_id(tokenizer, family)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

"""gemtune's Gemma chat templates as Jinja, for a merged model's tokenizer.

The bases gemtune ships (the embedded GGUF conversion, the tiny test models) carry no chat template: gemtune renders
prompts itself (`gemtune.base.templates`). A merged model goes to engines that render with the tokenizer's template
(vLLM, TGI, transformers' `apply_chat_template`), so `gemtune merge` writes one that produces exactly the text
gemtune's own renderer does (a test checks both families). A tokenizer that has its own template keeps it.
"""

from __future__ import annotations

GEMMA3 = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- set msgs = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.prefix = (messages[0]['content'] | trim) + '\n\n' -%}"
    "{%- set msgs = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.prefix if loop.first else '') + (m['content'] | trim) }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

GEMMA4 = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<|turn>' + role + '\n' + (m['content'] | trim) + '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)

TEMPLATES = {"gemma3": GEMMA3, "gemma4": GEMMA4}


def ensure_chat_template(tokenizer, family) -> bool:
    """Give `tokenizer` gemtune's template for `family` when it has none; True when one was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = TEMPLATES[family.name]
    return True

"""gemtune's Gemma chat templates as Jinja, for a merged model's tokenizer.

The bases gemtune ships (the embedded GGUF conversion, the tiny test models) carry no chat template: gemtune renders
prompts itself (`gemtune.base.templates`). A merged model goes to engines that render with the tokenizer's template
(vLLM, TGI, transformers' `apply_chat_template`), so `gemtune merge` writes one that produces exactly the text
gemtune's own renderer does (a test checks both families), tool use included: `tools`, assistant `tool_calls` and
`tool` turns. Call arguments must be objects, as transformers' and vLLM's chat paths pass them (a JSON string is
written as given). A tokenizer that has its own template keeps it.
"""

from __future__ import annotations

GEMMA3 = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='', i=0) -%}"
    "{%- set msgs = messages -%}"
    "{%- set parts = [] -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set parts = parts + [messages[0]['content'] | trim] if (messages[0]['content'] | trim) else parts -%}"
    "{%- set msgs = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{%- set parts = parts + ['You can call these tools (OpenAI function definitions, as JSON):\n' + (tools | tojson)"
    " + '\n\nTo call a tool, write one block per call:\n<tool_call>\n{\"name\": \"<tool name>\", \"arguments\": "
    "{<the arguments>}}\n</tool_call>\nEach result comes back in a <tool_response> block.'] -%}"
    "{%- endif -%}"
    "{%- if parts or (messages and messages[0]['role'] == 'system') -%}"
    "{%- set ns.prefix = (parts | join('\n\n')) + '\n\n' -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- set head = ns.prefix if loop.first else '' -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<start_of_turn>user\n' + head }}{%- else -%}{{ '\n' }}"
    "{%- endif -%}"
    "{{ '<tool_response>\n' + ((m['content'] or '') | trim) + '\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<end_of_turn>\n' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' + ((m['content'] or '') | trim) }}"
    "{%- if m['tool_calls'] -%}"
    "{%- if (m['content'] or '') | trim -%}{{ '\n' }}{%- endif -%}"
    "{%- for c in m['tool_calls'] -%}"
    "{{ '<tool_call>\n' + ({'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson)"
    " + '\n</tool_call>' }}{{ '\n' if not loop.last else '' }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + m['role'] + '\n' + head + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Gemma 4's value notation (keys sorted, strings between <|"|>), as gemtune.base.templates.g4_value writes it.
_G4_VALUE = (
    "{%- macro g4(v) -%}"
    "{%- if v is mapping -%}{{ '{' }}{%- for k, x in v | dictsort(true) -%}{{ k + ':' }}{{ g4(x) }}"
    "{{ ',' if not loop.last else '' }}{%- endfor -%}{{ '}' }}"
    "{%- elif v is string -%}{{ '<|\"|>' + v + '<|\"|>' }}"
    "{%- elif v is boolean -%}{{ 'true' if v else 'false' }}"
    "{%- elif v is none -%}{{ 'null' }}"
    "{%- elif v is number -%}{{ v }}"
    "{%- else -%}{{ '[' }}{%- for x in v -%}{{ g4(x) }}{{ ',' if not loop.last else '' }}{%- endfor -%}{{ ']' }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

GEMMA4 = (
    "{{ bos_token }}"
    + _G4_VALUE +
    "{%- set ns = namespace(prev='', name='') -%}"
    "{%- set msgs = messages -%}"
    "{%- if (messages and messages[0]['role'] == 'system') or tools -%}"
    "{{ '<|turn>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] | trim }}{%- set msgs = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for t in tools or [] -%}"
    "{{ '<|tool>declaration:' + t['function']['name'] + '{' }}"
    "{%- for k, x in t['function'] | dictsort(true) if k != 'name' -%}{{ k + ':' }}{{ g4(x) }}"
    "{{ ',' if not loop.last else '' }}{%- endfor -%}{{ '}<tool|>' }}"
    "{%- endfor -%}"
    "{{ '<turn|>\n' }}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- set ns.name = m['name'] or '' -%}"
    "{%- if not ns.name -%}"
    "{%- for a in messages if a['role'] == 'assistant' and a['tool_calls'] -%}"
    "{%- for c in a['tool_calls'] if c['id'] == m['tool_call_id'] -%}{%- set ns.name = c['function']['name'] -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ ('' if ns.prev == 'assistant' else '<|tool_response>') + 'response:' + (ns.name or 'tool') + '{value:<|\"|>'"
    " + ((m['content'] or '') | trim) + '<|\"|>}<tool_response|>' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ '' if ns.prev == 'tool' else '<|turn>model\n' }}{{ (m['content'] or '') | trim }}"
    "{%- for c in m['tool_calls'] or [] -%}"
    "{{ '<|tool_call>call:' + c['function']['name'] }}"
    "{%- if c['function']['arguments'] is mapping -%}{{ g4(c['function']['arguments']) }}"
    "{%- else -%}{{ c['function']['arguments'] }}{%- endif -%}{{ '<tool_call|>' }}"
    "{%- endfor -%}"
    "{{ '<|tool_response>' if m['tool_calls'] else '<turn|>\n' }}"
    "{%- else -%}"
    "{{ '<|turn>' + m['role'] + '\n' + (m['content'] | trim) + '<turn|>\n' }}"
    "{%- endif -%}"
    "{%- set ns.prev = m['role'] -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.prev != 'tool' -%}{{ '<|turn>model\n' }}{%- endif -%}"
)

TEMPLATES = {"gemma3": GEMMA3, "gemma4": GEMMA4}


def ensure_chat_template(tokenizer, family) -> bool:
    """Give `tokenizer` gemtune's template for `family` when it has none; True when one was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = TEMPLATES[family.name]
    return True

"""Chat templates a recipe can name with ``chat_template:``, and resolving ``auto``.

A value is one of the names below, ``auto`` (the template most of the inputs carry), or
a Jinja template written out in full.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

from orchestrator.errors import RecipeError

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}


def resolve_chat_template(value: str | None, tokenizer_configs: Iterable[bytes | None]) -> str | None:
    """The template text for the recipe's ``chat_template`` value (None leaves it as is)."""
    if value is None:
        return None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if value == "auto":
        found = Counter()
        for raw in tokenizer_configs:
            if raw:
                template = json.loads(raw).get("chat_template")
                if isinstance(template, str):
                    found[template] += 1
        if not found:
            raise RecipeError("chat_template: auto found no chat template in the inputs' tokenizer_config.json; name one: " + ", ".join(sorted(TEMPLATES)))
        return found.most_common(1)[0][0]
    if "{{" in value or "{%" in value:
        return value
    raise RecipeError(
        f"chat_template '{value}' is neither a known name ({', '.join(sorted(TEMPLATES))}), 'auto', nor a Jinja template"
    )

"""Chat templates for base models whose tokenizer has none."""
from __future__ import annotations

from typing import Optional

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}


def apply_template_override(tokenizer, template: Optional[str]) -> None:
    """Set `tokenizer.chat_template` from a name ("chatml") or a literal Jinja template."""
    if template:
        tokenizer.chat_template = NAMED.get(template, template)

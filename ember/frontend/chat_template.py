"""Chat templates: the tokenizer's own, or an override given with --chat-template (file or text)."""
from __future__ import annotations

import json
import os

# A few named templates for models that ship without one.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}


def load_chat_template_override(value: str | None) -> str | None:
    """The template text for --chat-template: a path to a .jinja/.txt/.json file, a builtin name, or
    the template itself. Raises ValueError naming the flag when it is none of these."""
    if value is None or value == "":
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--chat-template {value}: not valid JSON: {e}") from e
            text = data.get("chat_template") if isinstance(data, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"--chat-template {value}: the JSON file has no string 'chat_template' key")
        return text
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither an existing file, a builtin template "
                     f"({', '.join(BUILTIN_TEMPLATES)}), nor Jinja template text")

"""The output's chat template (mergekit's top-level ``chat_template``).

``chat_template`` takes ``auto`` (the template most of the merged models share, as in mergekit), one of
the named formats in :data:`NAMED` (evomerge's own renderings of ChatML, Llama 3, Mistral and Alpaca), or
a Jinja template given inline. Without it the output keeps the tokenizer source's template.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import RecipeError

__all__ = ["NAMED", "check_chat_template", "model_chat_template", "resolve_chat_template"]

NAMED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token "
        "+ '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
"""Named chat formats (``chat_template: chatml``)."""


def model_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a model directory carries (chat_template.jinja, else tokenizer_config.json's
    ``chat_template``, its ``default`` entry when it holds several), or None."""
    root = Path(model_dir).expanduser()
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def check_chat_template(value: str) -> None:
    """RecipeError unless ``value`` is ``auto``, a named format or a Jinja template."""
    if value == "auto" or value in NAMED or "{" in value:
        return
    names = ", ".join(["auto", *NAMED])
    raise RecipeError(f"chat_template: {value!r} is neither a known name ({names}) nor a Jinja template")


def resolve_chat_template(value: str | None, models: Sequence[str]) -> str | None:
    """The template text to write for ``value`` (None: keep the tokenizer source's); ``auto`` picks the
    template most of ``models`` carry (the first in order among equally common ones; None when none has
    one)."""
    if value is None:
        return None
    check_chat_template(value)
    if value == "auto":
        found = [t for t in (model_chat_template(m) for m in models) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(value, value)

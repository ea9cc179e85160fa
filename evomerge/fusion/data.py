"""Instruction-response data for heterogeneous fusion: loading, rendering to text, and encoding.

A :class:`Pair` is one instruction and its gold response. :func:`render` turns it into the text a model
reads (prompt + response) and remembers which characters are the response; :func:`encode` tokenizes that
text and marks the response tokens in ``labels`` (every other token is ``-100``), so a loss on the labels
is a loss on the response only.

Accepted JSONL records (one per line, plain or gzip-compressed):

* ``{"instruction": "...", "response": "...", "id": "..."}`` (``id`` optional, string or integer);
* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}``:
  the last assistant message is the response, the messages before it are the prompt (``id`` optional).

A pair without an id gets ``line<N>`` (its line number). Every problem is a
:class:`~evomerge.errors.ConfigError` whose one-line message names ``file:line``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluators.jsonl import JSONLError, read_records, read_text

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "Encoded",
    "Pair",
    "RenderedText",
    "encode",
    "load_pairs",
    "render",
]

DEFAULT_TEMPLATE = "{instruction}\n"
"""The plain (non-chat) prompt template: ``{instruction}`` is replaced by the instruction text."""

IGNORE_INDEX = -100
"""The label of a token that is not part of the response (ignored by the loss)."""

_NO_RESPONSE = (
    'data without responses: this record has no non-empty response (give a non-empty "response" '
    'or end "messages" with an assistant message)'
)


@dataclass(frozen=True)
class Pair:
    """One instruction-response example."""

    id: str
    prompt_messages: tuple[tuple[str, str], ...]
    """The conversation before the response, as (role, content); at least one user message."""
    response: str
    origin: str = ""
    """Where the pair came from, ``file:line`` (empty for pairs built in code)."""

    @property
    def instruction(self) -> str:
        """The content of the last user message of the prompt (the plain template's ``{instruction}``)."""
        for role, content in reversed(self.prompt_messages):
            if role == "user":
                return content
        return ""

    @classmethod
    def of(cls, instruction: str, response: str, *, id: str = "", origin: str = "") -> Pair:
        """A single-turn pair (``id`` defaults to ``origin`` or the empty string)."""
        return cls(
            id=id or origin, prompt_messages=(("user", instruction),), response=response, origin=origin
        )


@dataclass(frozen=True)
class RenderedText:
    """The text a model reads for one pair and the character span ``[start, end)`` of the response."""

    text: str
    response_start: int
    response_end: int

    @property
    def prompt(self) -> str:
        return self.text[: self.response_start]

    @property
    def response(self) -> str:
        return self.text[self.response_start : self.response_end]


@dataclass(frozen=True)
class Encoded:
    """One tokenized pair.

    ``labels[t]`` is ``input_ids[t]`` for a response token and :data:`IGNORE_INDEX` otherwise; ``offsets``
    are the tokens' character spans in the rendered text (``(0, 0)`` for added special tokens such as
    BOS); ``tokens`` are the tokenizer's own token strings (with its space markers, e.g. ``Ġ`` or ``▁``).
    ``truncated`` says whether tokens were cut off at ``max_len``.
    """

    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    tokens: list[str]
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- loading
def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def _text_field(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _pair_id(record: Mapping[str, Any], where: str, lineno: int) -> str:
    if "id" not in record or record["id"] is None:
        return f"line{lineno}"
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{where}: 'id' must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise ConfigError(f"{where}: 'id' is empty")
    return text


def _from_messages(record: Mapping[str, Any], where: str) -> tuple[tuple[tuple[str, str], ...], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}: messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ConfigError(f"{where}: messages[{i}] has no 'role' string")
        if not isinstance(content, str):
            raise ConfigError(f"{where}: messages[{i}] 'content' must be a string")
        parsed.append((role, content))
    last = max((i for i, (role, _) in enumerate(parsed) if role == "assistant"), default=None)
    if last is None or not parsed[last][1].strip():
        raise ConfigError(f"{where}: {_NO_RESPONSE}")
    prompt = tuple(parsed[:last])
    if not any(role == "user" for role, _ in prompt):
        raise ConfigError(f"{where}: no user message before the last assistant message")
    return prompt, parsed[last][1]


def _parse_record(record: Mapping[str, Any], where: str) -> tuple[tuple[tuple[str, str], ...], str]:
    if "messages" in record:
        if "instruction" in record or "response" in record:
            raise ConfigError(f"{where}: give either 'messages' or 'instruction'/'response', not both")
        return _from_messages(record, where)
    if "instruction" not in record:
        if "response" in record:
            raise ConfigError(f"{where}: record has a 'response' but no 'instruction'")
        keys = ", ".join(sorted(record)) or "none"
        raise ConfigError(
            f"{where}: expected 'instruction' and 'response' or 'messages' (keys found: {keys})"
        )
    instruction = _text_field(record, "instruction", where)
    if "response" not in record or record["response"] is None:
        raise ConfigError(f"{where}: {_NO_RESPONSE}")
    response = _text_field(record, "response", where)
    if not response.strip():
        raise ConfigError(f"{where}: {_NO_RESPONSE}")
    return (("user", instruction),), response


def load_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file (see the module docstring for the accepted records).

    Raises ConfigError, naming ``file:line``, for a missing or unreadable file, an empty file, a line
    that is not a JSON object, a record without a non-empty response, and a duplicate id.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data file does not exist: {p}")
    if not p.is_file():
        raise ConfigError(f"data path is not a file: {p}")
    try:
        text = read_text(p)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{p}: unreadable data file ({reason})") from None
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    try:
        for lineno, record in read_records(text):
            where = _where(p, lineno)
            prompt, response = _parse_record(record, where)
            pair_id = _pair_id(record, where, lineno)
            if pair_id in seen:
                raise ConfigError(f"{where}: duplicate id {pair_id!r} (first on line {seen[pair_id]})")
            seen[pair_id] = lineno
            pairs.append(Pair(id=pair_id, prompt_messages=prompt, response=response, origin=where))
    except JSONLError as exc:
        raise ConfigError(f"{_where(p, exc.lineno)}: {exc.reason}") from None
    if not pairs:
        raise ConfigError(f"{p}:1: empty data file (no instruction-response records)")
    return pairs


# ---------------------------------------------------------------------------------------------- rendering
def render(pair: Pair, tokenizer: Any, *, template: str | None = None, chat: bool = False) -> RenderedText:
    """The text ``prompt + response`` for ``pair`` and the character span of the response in it.

    With ``chat`` the prompt is the tokenizer's chat template applied to the prompt messages with the
    generation prompt added (ConfigError when the tokenizer has no chat template; ``template`` must then
    be None). Otherwise the prompt is ``template`` (default :data:`DEFAULT_TEMPLATE`) with the literal
    ``{instruction}`` replaced by the instruction (other braces are kept as they are).
    """
    if chat:
        if template is not None:
            raise ConfigError("give either a prompt template or chat=True, not both")
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(f"chat=True but the tokenizer {name} has no chat template")
        messages = [{"role": role, "content": content} for role, content in pair.prompt_messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises TemplateError and others for a template that fails
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{pair.origin or pair.id}: the chat template failed ({reason})") from None
        if not isinstance(prompt, str):
            raise ConfigError("the tokenizer's chat template did not return text")
    else:
        fmt = DEFAULT_TEMPLATE if template is None else template
        if "{instruction}" not in fmt:
            raise ConfigError(f"prompt template {fmt!r} has no {{instruction}} placeholder")
        prompt = fmt.replace("{instruction}", pair.instruction)
    return RenderedText(
        text=prompt + pair.response, response_start=len(prompt), response_end=len(prompt) + len(pair.response)
    )


# ---------------------------------------------------------------------------------------------- encoding
def _starts_with_bos(text: str, tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return isinstance(bos, str) and bool(bos) and text.startswith(bos)


def encode(rendered: RenderedText, tokenizer: Any, max_len: int) -> Encoded:
    """Tokenize ``rendered.text``; response tokens keep their id in ``labels``, others get -100.

    Special tokens are added the tokenizer's way (e.g. a BOS from its post-processor), except when the
    text already begins with the BOS string (chat templates often write it). A token is a response token
    when its character span overlaps the response span. Tokens past ``max_len`` are cut off (the end of
    the text is dropped). Needs a fast tokenizer (character offsets); ConfigError otherwise.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be at least 1, got {max_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} does not give character offsets "
            "(a fast tokenizer with tokenizer.json is needed)"
        )
    add_special = not _starts_with_bos(rendered.text, tokenizer)
    try:
        enc = tokenizer(rendered.text, add_special_tokens=add_special, return_offsets_mapping=True)
    except NotImplementedError:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} does not support return_offsets_mapping"
        ) from None
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    truncated = len(ids) > max_len
    ids, offsets = ids[:max_len], offsets[:max_len]
    start, end = rendered.response_start, rendered.response_end
    labels = [
        tid if (s < end and e > start and e > s) else IGNORE_INDEX
        for tid, (s, e) in zip(ids, offsets, strict=True)
    ]
    raw_tokens = tokenizer.convert_ids_to_tokens(ids)
    tokens: list[str] = []
    for tid, tok in zip(ids, raw_tokens, strict=True):
        if not isinstance(tok, str):
            raise ConfigError(f"the tokenizer has no token string for id {tid}")
        tokens.append(tok)
    return Encoded(input_ids=ids, labels=labels, offsets=offsets, tokens=tokens, truncated=truncated)

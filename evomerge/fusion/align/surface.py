"""The surface strings of tokens: each token's text as the tokenizer's own decoder writes it (space markers
of byte-level BPE, SentencePiece and WordPiece decoded, special tokens empty; the rules are in the
package docstring), and the alignment key (:func:`text_key`)."""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Iterable
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

# A plain letter decoded in front of a token, so that decoders which strip the space of the *first* token
# of a text (Metaspace, Llama's Strip) keep a word-initial token's leading space; its own decoding is
# removed again afterwards.
_ANCHOR = "a"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def text_key(s: str) -> str:
    """The alignment key of a surface string: ``s`` with every whitespace character removed."""
    return "".join(s.split())


def _decoder_types(decoder: Any) -> set[str]:
    """The ``type`` names of a ``tokenizers`` decoder and, for a ``Sequence``, of all its children."""
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:  # pragma: no cover - decoders always pickle to JSON in tokenizers >= 0.13
        return {type(decoder).__name__}
    found: set[str] = set()
    stack: list[Any] = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class _Codec:
    """Per-tokenizer helper that turns token ids into the UTF-8 bytes of their surface text.

    Three routes, chosen from the tokenizer's own decoder:

    - byte-level (a ``ByteLevel`` decoder, or a slow tokenizer with ``byte_decoder``): every character of
      the token is mapped to its byte with the GPT-2 byte<->unicode table that the tokenizer itself uses
      (``tokenizer.byte_decoder`` when present, else ``transformers``' ``bytes_to_unicode``); a character
      outside the table contributes its own UTF-8 bytes;
    - byte fallback (a ``ByteFallback`` decoder): a ``<0xNN>`` piece is the single byte ``NN``;
    - otherwise the tokenizer's decoder is run on ``[_ANCHOR, token]`` and the anchor's decoding is cut off
      (``[token]`` alone for the first token of a text), so ``▁`` -> space, ``##`` -> glued, etc.
    """

    def __init__(self, tokenizer: Any) -> None:
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(idx))
        self.special_ids = frozenset(special)
        # A weak reference: the codec is cached in a WeakKeyDictionary keyed by this tokenizer.
        try:
            ref = weakref.ref(tokenizer)
            self._tokenizer: Any = lambda: ref()
        except TypeError:
            self._tokenizer = lambda: tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.decoder = backend.decoder if backend is not None else None
        kinds = _decoder_types(self.decoder) if self.decoder is not None else set()
        self.byte_level = "ByteLevel" in kinds or (backend is None and hasattr(tokenizer, "byte_decoder"))
        self.byte_fallback = "ByteFallback" in kinds
        table = getattr(tokenizer, "byte_decoder", None)
        if not isinstance(table, dict):
            table = {ch: b for b, ch in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        self.byte_table: dict[str, int] = table
        self.vocab_size = len(tokenizer)
        self._anchor_prefix = self._decode([_ANCHOR])
        self._mid_cache: dict[int, bytes] = {}

    def _decode(self, pieces: list[str]) -> str:
        if self.decoder is not None:
            return str(self.decoder.decode(pieces))
        tokenizer = self._tokenizer()
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            return str(tokenizer.convert_tokens_to_string(pieces))
        # A fast tokenizer without a decoder: apply the SentencePiece / WordPiece marker rules directly.
        return "".join(p[2:] if p.startswith("##") else p.replace("▁", " ") for p in pieces)

    def piece(self, token_id: int) -> str | None:
        """The raw vocabulary string of an id (``None`` when the id is out of range or unassigned)."""
        if token_id < 0 or token_id >= self.vocab_size:
            return None
        tok = self._tokenizer().convert_ids_to_tokens(token_id)
        return tok if isinstance(tok, str) else None

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """UTF-8 bytes of the surface text of one token; ``first``: as the first token of a text."""
        if token_id in self.special_ids:
            return b""
        if not first and token_id in self._mid_cache:
            return self._mid_cache[token_id]
        out = self._bytes_of(self.piece(token_id), first)
        if not first:
            self._mid_cache[token_id] = out
        return out

    def _bytes_of(self, tok: str | None, first: bool) -> bytes:
        if not tok:
            return b""
        if self.byte_level:
            table = self.byte_table
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in tok)
        if self.byte_fallback:
            m = _BYTE_PIECE.match(tok)
            if m:
                return bytes([int(m.group(1), 16)])
        if first:
            return self._decode([tok]).encode("utf-8", "surrogatepass")
        text = self._decode([_ANCHOR, tok])
        if text.startswith(self._anchor_prefix):
            text = text[len(self._anchor_prefix) :]
        else:  # pragma: no cover - no known decoder rewrites a plain letter
            text = self._decode([tok])
        return text.encode("utf-8", "surrogatepass")


_CODECS: weakref.WeakKeyDictionary[Any, _Codec] = weakref.WeakKeyDictionary()


def _codec(tokenizer: Any) -> _Codec:
    try:
        codec = _CODECS.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: build one per call
        return _Codec(tokenizer)
    if codec is None:
        codec = _Codec(tokenizer)
        _CODECS[tokenizer] = codec
    return codec


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids :func:`token_strings` treats as special (all special ids + added tokens flagged special)."""
    return _codec(tokenizer).special_ids


def token_strings(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """The surface string of every token of one tokenized text (see the package docstring).

    Each token's UTF-8 bytes are produced by the tokenizer's own decoder (see :class:`_Codec`); the first
    non-special token is decoded as the first token of a text (so a Metaspace / Llama decoder drops its
    prepended space exactly as ``tokenizer.decode`` does), every later one as a mid-text token.

    Multi-byte UTF-8 characters split over several tokens: the byte stream of the whole sequence is fed
    through one incremental UTF-8 decoder (``errors="replace"``), and each token gets the characters
    *completed* by its bytes. A token holding only leading bytes of a character therefore gets ``""``
    (or just its complete characters, e.g. ``" "`` for ``"Ġæ"``), the token with the final byte gets the
    whole character, and bytes that never form a valid character become U+FFFD in the token where the
    decoder rejects them (anything still pending at the end goes to the last token with bytes). Hence,
    for a lossless tokenizer, ``"".join(token_strings(tok, ids)) == tok.decode(ids,
    skip_special_tokens=True)``. Special tokens and out-of-range ids give ``""``.
    """
    codec = _codec(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[str] = []
    first = True
    last_with_bytes = -1
    for raw in ids:
        token_id = int(raw)
        if token_id in codec.special_ids:
            out.append("")
            continue
        data = codec.token_bytes(token_id, first=first)
        first = False
        if data:
            last_with_bytes = len(out)
        out.append(decoder.decode(data))
    tail = decoder.decode(b"", final=True)
    if tail and last_with_bytes >= 0:
        out[last_with_bytes] += tail
    return out


def vocab_strings(tokenizer: Any) -> list[str]:
    """The context-free surface string of every id ``0 .. len(tokenizer) - 1`` (mid-text form).

    A word-initial token keeps its leading space (``"Ġthe"``/``"▁the"``/WordPiece ``"the"`` -> ``" the"``).
    Bytes that are not valid UTF-8 on their own (a byte-level token or ``<0xNN>`` piece holding part of a
    multi-byte character) are decoded with ``errors="surrogateescape"``: each such byte ``b`` becomes the
    lone surrogate ``U+DC00 + b``. That keeps distinct byte tokens distinct, makes the same byte in two
    tokenizers the same string, and never equals a real character. Special and unassigned ids give ``""``.
    """
    codec = _codec(tokenizer)
    out: list[str] = []
    for token_id in range(codec.vocab_size):
        out.append(codec.token_bytes(token_id).decode("utf-8", "surrogateescape"))
    return out

"""Token alignment between two tokenizations of the same text, and source -> pivot vocabulary maps.

Heterogeneous fusion distils a *source* model that uses another tokenizer into the *pivot* model. This
package provides the three pieces that needs:

1. :func:`token_strings` / :func:`vocab_strings`: the surface text of each token, with the tokenizer's
   own space markers decoded (SentencePiece ``▁``, byte-level ``Ġ``/``Ċ``/other byte characters,
   WordPiece ``##``, ``<0xNN>`` byte-fallback pieces).
2. :func:`align`: a DTW alignment of two token-string sequences whose pairing cost is the Levenshtein
   distance of the whitespace-free strings (and :func:`align_spans` / ``align(method="auto")``, an
   exact O(n + m) character-span alignment when both sequences spell the same characters).
3. :class:`VocabMap`: source id -> pivot id, by exact string (``"exact"``), by minimum edit distance
   (``"min_ed"``) or by co-alignment statistics over a corpus (``"stats"``).

Normalisation rules (one place, used everywhere):

- *Surface string* (what :func:`token_strings` returns): the token's text exactly as the tokenizer's
  own decoder writes it in the middle of a text, so a word-initial token keeps its leading space
  (``"Ġthe"`` and ``"▁the"`` both become ``" the"``, WordPiece ``"the"`` becomes ``" the"`` and
  ``"##s"`` becomes ``"s"``); only the first token of a text is decoded as the decoder does at the start
  (a Metaspace ``"▁The"`` there is ``"The"``). Special tokens (BOS/EOS/PAD/UNK and every added token
  flagged special) are ``""``: they align with nothing. A character whose UTF-8 bytes are split over
  several tokens belongs to the token holding its last byte (the others get ``""`` for it), so the
  strings of a lossless tokenizer concatenate to the exact text. (WordPiece drops the original
  whitespace, so its strings rebuild the text only modulo whitespace.)
- *Alignment key* (:func:`text_key`): the surface string with **all** whitespace characters removed
  (``str.split()`` semantics), so ``" the"`` and ``"the"`` cost 0 and whitespace-only tokens have the
  empty key.
- Edit distance: plain Levenshtein (unit insert/delete/substitute) over Unicode code points.

Modules
-------
- ``surface``: the surface strings of tokens (:func:`token_strings`, :func:`vocab_strings`,
  :func:`text_key`, :func:`special_ids`) from each tokenizer's own decoder;
- ``edit_distance``: the vectorised Levenshtein (:func:`edit_distance_matrix`, :func:`levenshtein`);
- ``alignment``: :class:`Alignment`, :func:`align` (DTW) and :func:`align_spans` (character spans);
- ``vocab_map``: :class:`VocabMap` and :func:`co_alignment_counts`.
"""

from evomerge.fusion.align.alignment import Alignment, AlignMethod, align, align_spans
from evomerge.fusion.align.edit_distance import IntArray, edit_distance_matrix, levenshtein
from evomerge.fusion.align.surface import special_ids, text_key, token_strings, vocab_strings
from evomerge.fusion.align.vocab_map import Fallback, Method, VocabMap, co_alignment_counts

__all__ = [
    "AlignMethod",
    "Alignment",
    "Fallback",
    "IntArray",
    "Method",
    "VocabMap",
    "align",
    "align_spans",
    "co_alignment_counts",
    "edit_distance_matrix",
    "levenshtein",
    "special_ids",
    "text_key",
    "token_strings",
    "vocab_strings",
]

"""The source pass of heterogeneous fusion and its on-disk cache.

:func:`source_pass` runs a source model once over instruction-response pairs and stores, per sequence,
what distillation needs, so the distillation pass never loads the source again:

* ``input_ids`` [T] and ``labels`` [T] (the id on response tokens, -100 elsewhere) of the source's own
  tokenization (see :func:`evomerge.fusion.data.encode`), the tokens' character ``offsets`` [T, 2] in the
  rendered text and their token strings;
* ``topk_ids`` [T, k] and ``topk_logprobs`` [T, k]: **row t is the source's distribution predicting the
  token at position t**, computed from the logits at position t-1 (top-k of ``log_softmax``, sorted
  descending). Row 0 predicts nothing: its ids are -1 and its log-probs ``-inf``;
* ``ce``: the cross-entropy of the source on the gold response, the mean of ``-log p(token_t)`` over the
  response tokens at positions t >= 1 (nats). A sequence with no response token left after truncation
  has ``ce = NaN`` (listed under ``no_response_tokens`` in the manifest).

On-disk format (``FORMAT_VERSION`` 1), a directory holding:

* ``manifest.json``: the settings the cache was made with (source path and fingerprint, tokenizer class
  and vocab size, top_k, max_len, template, chat, dtypes, data and token hashes, pair ids, the shard plan)
  and ``complete_shards``, the shards already written;
* ``shard-00000.safetensors`` ...: shard j holds sequences ``[j * shard_size, (j + 1) * shard_size)``,
  concatenated along the token axis: ``offsets`` int64 [n+1] (sequence i is rows
  ``offsets[i]:offsets[i+1]``), ``input_ids``/``labels`` int32 [N], ``char_offsets`` int32 [N, 2],
  ``topk_ids`` int32 [N, k], ``topk_logprobs`` float32 (or float16 with ``logprob_dtype``) [N, k] and
  ``ce`` float32 [n]; the header metadata holds the pair ids and the token strings (JSON).

Every shard and every manifest update is written to a temporary sibling and renamed into place, so a
pass that stops (an error, an interrupt, a progress callback that raises) leaves only whole shards;
running it again with the same settings keeps them and computes only the missing sequences.

Modules
-------
- ``storage``: the on-disk format (names, constants, manifest and shard headers read and checked, atomic
  writes);
- ``reader``: :class:`SourceCache` and :class:`CachedSequence`, a finished cache read lazily;
- ``forward``: the source model's side (loading it, right-padded batches, top-k log-probs and CE per
  sequence, the tensors of a shard);
- ``resume``: what an existing output directory holds (shards kept, a cache of other settings refused);
- ``runner``: :func:`source_pass` and :class:`PassProgress`.
"""

from evomerge.fusion.cache.reader import CachedSequence, SourceCache
from evomerge.fusion.cache.runner import PassProgress, source_pass
from evomerge.fusion.cache.storage import CACHE_FORMAT, FORMAT_VERSION, MANIFEST, shard_name
from evomerge.fusion.cache.storage import ROW_CONVENTION as ROW_CONVENTION

__all__ = [
    "CACHE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CachedSequence",
    "PassProgress",
    "SourceCache",
    "shard_name",
    "source_pass",
]

"""The result cache: forward-pass rows of inputs a model has seen, bounded in bytes.

A row is what the model's task keeps of one input from a forward pass (a pooled vector,
label probabilities, per-token scores), before any per-call option (normalize, top_k,
aggregation) is applied. It depends only on the model and the token ids it sees, so the
key is the model (its name, which fixes backend, device and dtype for the server's life,
and its manifest digest, which pins the files), its task and a BLAKE2b-256 digest of the
input's ids and token type ids. The ids already hold the text and every option that
changes what the model sees (truncation, the pair of a rerank or zero-shot input); two
texts the tokenizer encodes alike (case, for an uncased model) share a row, which is
exact. Pure and single-threaded: the dataplane uses it on the event loop only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sidecar.tasks.tokenization import EncodedText

Row = npt.NDArray[np.float32]

# What one entry costs beyond its row and key: the dict slot, the key tuple and the array
# header. Counted so that a bound of many tiny rows still holds the process's memory.
ENTRY_OVERHEAD = 256


class RowKey(NamedTuple):
    """Which row: the model, its manifest digest, its task and the ids it sees."""

    model: str
    revision: str
    task: str
    tokens: bytes  # BLAKE2b-256 of the ids and type ids

    @property
    def size(self) -> int:
        """The key's own bytes."""
        return len(self.model) + len(self.revision) + len(self.task) + len(self.tokens)


def row_key(model: str, revision: str, task: str, item: EncodedText) -> RowKey:
    """The key of one encoded input's row on a model."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(np.ascontiguousarray(item.ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(item.type_ids, dtype=np.int64).tobytes())
    return RowKey(model, revision, task, digest.digest())


def entry_size(key: RowKey, row: Row) -> int:
    """Bytes one entry counts against the bound."""
    return row.nbytes + key.size + ENTRY_OVERHEAD


class ResultCache:
    """Rows by key, least recently used evicted first, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._rows: OrderedDict[RowKey, Row] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held now (rows, keys and per-entry overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: RowKey) -> Row | None:
        """The row for `key` (now the most recently used), or None."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: RowKey, row: Row) -> None:
        """Keep a copy of `row` under `key`, evicting the least recently used to fit; a row
        larger than the whole bound is not kept."""
        size = entry_size(key, row)
        if size > self.max_bytes:
            return
        old = self._rows.pop(key, None)
        if old is not None:
            self._bytes -= entry_size(key, old)
        # A copy: a row may be a view into its whole batch, which must not stay alive.
        kept = np.array(row, copy=True)
        kept.flags.writeable = False
        self._rows[key] = kept
        self._bytes += size
        while self._bytes > self.max_bytes:
            evicted, evicted_row = self._rows.popitem(last=False)
            self._bytes -= entry_size(evicted, evicted_row)

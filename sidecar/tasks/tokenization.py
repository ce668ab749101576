"""The model dir's own tokenizer (tokenizer.json), with truncation and padding the sidecar controls.

The tokenizer is loaded from the model dir, never re-created from a name, so the ids the
model sees are exactly those it was exported with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from sidecar.domain import Tokens
from sidecar.errors import PROPAGATE, InvalidInputError, ModelLoadError
from sidecar.model_files import MAX_TOKENIZER_BYTES, absent, read_json_object, read_text

TOKENIZER_FILE = "tokenizer.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedText:
    """One input's ids with special tokens, unpadded, and whether truncation cut it."""

    ids: npt.NDArray[np.int64]
    type_ids: npt.NDArray[np.int64]
    truncated: bool
    # Entity extraction only: where each token lies in the text (code points), which are
    # special tokens, and the token strings (word-piece detection).
    offsets: tuple[tuple[int, int], ...] = ()
    special: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        """Tokens the model sees for this input."""
        return len(self.ids)


@dataclass(frozen=True)
class EncodedBatch:
    """Padded model inputs for a batch, plus what truncation did to each input."""

    input_ids: npt.NDArray[np.int64]
    attention_mask: npt.NDArray[np.int64]
    token_type_ids: npt.NDArray[np.int64]
    token_counts: list[int]
    truncated: list[bool]

    def feed(self) -> dict[str, npt.NDArray[np.int64]]:
        """The arrays by the input names encoder graphs use (a backend takes those it has)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


def _special_token(model_dir: Path, tokenizer: Tokenizer, name: str) -> int | None:
    """A special token's id as transformers would pick it (name: "pad_token", "unk_token"):
    tokenizer_config, special_tokens_map, then config.json's <name>_id."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        token = (read_json_object(model_dir / file) or {}).get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
            return int(token_id)
    token_id = (read_json_object(model_dir / "config.json") or {}).get(f"{name}_id")
    return token_id if isinstance(token_id, int) else None


def read_tokenizer(model_dir: Path) -> str:
    """tokenizer.json's text, bounded in size; ModelLoadError naming the file otherwise."""
    path = model_dir / TOKENIZER_FILE
    if absent(path):
        raise ModelLoadError(f"{model_dir} has no {TOKENIZER_FILE}: re-export the model dir")
    return read_text(path, MAX_TOKENIZER_BYTES)


def new_tokenizer(model_dir: Path, text: str) -> Tokenizer:
    """A tokenizer from tokenizer.json's text, whatever the library refuses named by file."""
    try:
        return Tokenizer.from_str(text)
    except PROPAGATE:
        raise
    except BaseException as exc:  # bare Exception with serde's message, or a Rust panic
        raise ModelLoadError(
            f"{model_dir / TOKENIZER_FILE} is not a tokenizer the tokenizers library can read "
            f"({exc}): export the model dir again"
        ) from None


def _encoded(encoding: Encoding, *, truncated: bool, with_offsets: bool) -> EncodedText:
    ids = np.asarray(encoding.ids, dtype=np.int64)
    types = np.asarray(encoding.type_ids, dtype=np.int64)
    if not with_offsets:
        return EncodedText(ids, types, truncated)
    return EncodedText(
        ids,
        types,
        truncated,
        offsets=tuple((int(a), int(b)) for a, b in encoding.offsets),
        special=tuple(encoding.special_tokens_mask),
        tokens=tuple(encoding.tokens),
    )


class TextEncoder:
    """Turns text into padded id arrays for one model; safe to share across threads."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        text = read_tokenizer(model_dir)
        # Two instances, configured once: mutating one while another thread encodes is unsafe.
        self._full = new_tokenizer(model_dir, text)
        self._full.no_truncation()
        self._full.no_padding()
        self._cut = new_tokenizer(model_dir, text)
        self._cut.no_padding()
        self._cut.enable_truncation(max_length)
        # Pairs are cut on one side only: rerank keeps the query, zero-shot the hypothesis.
        self._pair_cut: dict[str, Tokenizer] = {}
        for strategy in ("only_first", "only_second"):
            cut = new_tokenizer(model_dir, text)
            cut.no_padding()
            cut.enable_truncation(max_length, strategy=strategy)
            self._pair_cut[strategy] = cut
        self.continuing_subword_prefix: str | None = getattr(
            self._full.model, "continuing_subword_prefix", None
        )
        # Entity extraction never counts the unknown token as a word piece.
        self.unk_id = _special_token(model_dir, self._full, "unk_token")
        self.max_length = max_length
        self.vocab_size = self._full.get_vocab_size(with_added_tokens=True)
        self.pad_id = _special_token(model_dir, self._full, "pad_token")
        self._path = model_dir / TOKENIZER_FILE

    @property
    def untruncated(self) -> Tokenizer:
        """The tokenizer without truncation or padding (generation encodes and decodes with it;
        it is configured once and never changed, so threads may share it)."""
        return self._full

    def check_encodes(self, *, pairs: bool) -> None:
        """Encode a text (and a pair, for pair tasks) with every instance, so a tokenizer
        whose templates are broken (the library panics) fails at load, not at each call."""
        tokenizers = [self._full, self._cut, *(self._pair_cut.values() if pairs else ())]
        try:
            for tokenizer in tokenizers:
                tokenizer.encode("A probe text.")
                if pairs:
                    tokenizer.encode("A probe text.", "And its pair.")
        except PROPAGATE:
            raise
        except Exception as exc:  # an error the call would get too (a WordLevel vocabulary
            # without an unknown token refuses the English probe): serve, and say so
            log.warning("%s could not encode the probe text: %s", self._path, exc)
        except BaseException as exc:  # a panic: the library's state is not to be trusted
            raise ModelLoadError(
                f"{self._path} cannot encode text ({type(exc).__name__}: {exc}): its "
                "post-processor or templates are broken; export the model dir again"
            ) from None

    def _encode(self, texts: Sequence[str], *, truncate: bool) -> tuple[list[Encoding], list[bool]]:
        encodings: list[Encoding] = self._full.encode_batch(list(texts))
        truncated = [len(e.ids) > self.max_length for e in encodings]
        if not truncate:
            for index, (encoding, over) in enumerate(zip(encodings, truncated, strict=True)):
                if over:
                    raise InvalidInputError(
                        f"inputs[{index}] is {len(encoding.ids)} tokens, over the model's limit "
                        f"of {self.max_length}: shorten it, or set truncate=true to cut it"
                    )
            return encodings, truncated
        # Re-encode only the over-long ones: truncation must happen before special tokens.
        for index, over in enumerate(truncated):
            if over:
                encodings[index] = self._cut.encode(texts[index])
        return encodings, truncated

    def encode_each(
        self, texts: Sequence[str], *, truncate: bool, with_offsets: bool = False
    ) -> list[EncodedText]:
        """Encode with special tokens, one unpadded input at a time (the batcher pads later)."""
        encodings, truncated = self._encode(texts, truncate=truncate)
        return [
            _encoded(e, truncated=cut, with_offsets=with_offsets)
            for e, cut in zip(encodings, truncated, strict=True)
        ]

    def encode_pairs(
        self, pairs: Sequence[tuple[str, str]], *, truncate: bool, keep: str
    ) -> list[EncodedText]:
        """Encode (first, second) pairs; an over-long pair loses tokens from the side not kept.

        `keep` is "first" (rerank: the query) or "second" (zero-shot: the hypothesis).
        """
        encodings: list[Encoding] = self._full.encode_batch(list(pairs))
        cutter = self._pair_cut["only_second" if keep == "first" else "only_first"]
        result = []
        for index, encoding in enumerate(encodings):
            over = len(encoding.ids) > self.max_length
            if over and not truncate:
                raise InvalidInputError(
                    f"inputs[{index}] with its pair is {len(encoding.ids)} tokens, over the "
                    f"model's limit of {self.max_length}: shorten it, or set truncate=true"
                )
            if over:
                try:
                    encoding = cutter.encode(*pairs[index])
                except Exception:  # tokenizers raises a bare Exception when the kept side
                    kept, cut = ("query", "passage") if keep == "first" else ("hypothesis", "text")
                    raise InvalidInputError(
                        f"the {kept} leaves no room for the {cut} within the model's limit of "
                        f"{self.max_length} tokens: shorten the {kept}"
                    ) from None
            result.append(_encoded(encoding, truncated=over, with_offsets=False))
        return result

    def pad(self, items: Sequence[EncodedText]) -> EncodedBatch:
        """Pad encoded inputs to the longest of them."""
        if self.pad_id is None:
            raise ModelLoadError("the tokenizer has no pad token; batching needs one")
        lengths = [item.length for item in items]
        width = max(lengths)
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        types = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            n = lengths[row]
            ids[row, :n] = item.ids
            mask[row, :n] = 1
            types[row, :n] = item.type_ids
        return EncodedBatch(ids, mask, types, lengths, [item.truncated for item in items])

    def encode(self, texts: Sequence[str], *, truncate: bool) -> EncodedBatch:
        """Encode with special tokens, pad to the longest, and report truncation."""
        return self.pad(self.encode_each(texts, truncate=truncate))

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, truncate: bool
    ) -> list[Tokens]:
        """Tokens, ids and code-point offsets as the model would see them."""
        tokenizer = self._cut if truncate else self._full
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [
            Tokens(
                ids=list(encoding.ids),
                tokens=list(encoding.tokens),
                offsets=[(int(a), int(b)) for a, b in encoding.offsets],
                truncated=truncate and bool(encoding.overflowing),
            )
            for encoding in encodings
        ]

"""The bytes each token id stands for, read from a tokenizer.json.

A grammar engine matches tokens by the bytes they add to the reply, so it needs every
token's bytes, including the tokens that hold part of a character. Three vocabularies are
in use: byte-level BPE (GPT-2, Llama 3, SmolLM2), whose token strings spell bytes through
GPT-2's printable alphabet; SentencePiece-style vocabularies (Llama 2, Mistral, T5, Marian),
whose "▁" is a space and whose `<0xNN>` tokens are single bytes when they fall back to
bytes (BPE or Unigram models); and WordPiece, which writes no spaces at all and cannot be
read this way.

The decoder chain alone does not say which one a tokenizer.json holds: SmolLM2's, as
transformers converts it from GGUF, has ByteFallback, Fuse, Replace("▁", " ") and ByteLevel
in one sequence, over a byte-level vocabulary. So the pre-tokenizer decides first: a
ByteLevel pre-tokenizer means every token string is spelled in the byte alphabet.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from sidecar.errors import WrongTaskError

# TokTrie's marker for special tokens: a byte no UTF-8 text holds, so a grammar's text can
# never spell a special token.
SPECIAL_MARKER = b"\xff"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (bytes_to_unicode), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _types(component: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (type, config) in a pre-tokenizer or decoder, sequences flattened."""
    if not isinstance(component, dict):
        return
    kind = component.get("type")
    if kind == "Sequence":
        for part in component.get("pretokenizers") or component.get("decoders") or []:
            yield from _types(part)
    elif isinstance(kind, str):
        yield kind, component


def _space_marks(decoder: Any) -> set[str]:
    """The characters a SentencePiece-style decoder turns into spaces ("▁" as a rule)."""
    marks = set()
    for kind, config in _types(decoder):
        if kind == "Metaspace":
            marks.add(str(config.get("replacement", "▁")))
        elif kind == "Replace" and config.get("content") == " ":
            pattern = config.get("pattern") or {}
            if isinstance(pattern.get("String"), str):
                marks.add(pattern["String"])
    return marks


def token_bytes(tokenizer_json: str) -> tuple[list[bytes], set[int]]:
    """Each token id's bytes (an empty entry for ids the vocabulary skips), and the ids of
    special tokens, whose bytes start with SPECIAL_MARKER.

    Raises WrongTaskError when the vocabulary is one a grammar cannot be matched against.
    """
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    kind = model.get("type") or "unknown"
    vocab = model.get("vocab")
    if kind == "WordPiece":
        raise WrongTaskError(
            "the model's WordPiece tokenizer writes no spaces between tokens, so replies cannot "
            "be constrained to a format: serve a byte-level BPE or SentencePiece model"
        )
    entries: list[tuple[str, int]]
    if isinstance(vocab, dict):  # BPE: piece -> id
        entries = [(str(piece), int(index)) for piece, index in vocab.items()]
    elif isinstance(vocab, list) and kind == "Unigram":  # [piece, score] in id order
        entries = [(str(entry[0]), index) for index, entry in enumerate(vocab)]
    else:
        raise WrongTaskError(
            f"the model's {kind} tokenizer has no vocabulary a grammar can be matched against"
        )
    byte_level = any(kind == "ByteLevel" for kind, _ in _types(spec.get("pre_tokenizer")))
    decoders = [kind for kind, _ in _types(spec.get("decoder"))]
    byte_level = byte_level or decoders == ["ByteLevel"]
    marks = _space_marks(spec.get("decoder"))
    if not byte_level and not marks and "ByteFallback" not in decoders:
        raise WrongTaskError(
            f"the model's tokenizer (decoder {decoders or 'none'}) is neither byte-level nor "
            "SentencePiece-style, so replies cannot be constrained to a format"
        )
    alphabet = _byte_alphabet() if byte_level else None
    fallback = bool(model.get("byte_fallback"))
    added = spec.get("added_tokens") or []
    size = max([*(i for _, i in entries), *(t["id"] for t in added)], default=-1)
    tokens = [b""] * (size + 1)
    for text, index in entries:
        tokens[index] = _spelled(text, alphabet, marks, fallback=fallback)
    special: set[int] = set()
    for token in added:
        content = str(token["content"]).encode()
        if token.get("special"):
            special.add(int(token["id"]))
            content = SPECIAL_MARKER + content
        tokens[int(token["id"])] = content
    return tokens, special


def _spelled(
    text: str, alphabet: dict[str, int] | None, marks: set[str], *, fallback: bool
) -> bytes:
    """One vocabulary entry's bytes."""
    byte = _BYTE_TOKEN.fullmatch(text) if fallback else None
    if byte:
        return bytes([int(byte[1], 16)])
    if alphabet is not None and all(c in alphabet for c in text):
        return bytes(alphabet[c] for c in text)
    for mark in marks:
        text = text.replace(mark, " ")
    return text.encode()

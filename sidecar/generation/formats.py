"""Response formats: replies held to a JSON schema, a regex, a list of choices or a grammar.

llguidance (the grammar engine behind vLLM's and SGLang's guidance backends) compiles a
format against the model's vocabulary and, at each decode step, says which tokens keep the
reply a prefix of a valid one. The README says why it was chosen over xgrammar: both
compute a mask in well under a millisecond on SmolLM2's 49k vocabulary, but xgrammar needs
torch, transformers and triton, which the serving image does not carry.

A `Grammars` per model holds the vocabulary's token table (built on its first constrained
call) and a bounded cache of compiled formats; each generation gets its own `Constraint`,
a copy of the compiled matcher that follows the tokens it chooses.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from sidecar.domain import FormatKind, ResponseFormat
from sidecar.errors import PROPAGATE, InvalidInputError, WrongTaskError
from sidecar.generation.token_bytes import token_bytes

log = logging.getLogger(__name__)

# The documented limits (docs/structured-output.md): big enough for any schema a service
# writes by hand, small enough that compiling one stays in milliseconds.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32  # nested JSON objects and arrays in the schema document
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
CACHE_ENTRIES = 64  # compiled formats kept per model
_MESSAGE_CHARS = 1000  # of llguidance's error text, quoted back to the caller

# JSON as json.dumps writes it: ", " and ": ", no other whitespace. Fixed separators keep a
# small model from filling the reply with spaces and newlines, and read as the JSON models
# saw most in training. Unsupported keywords are errors, whatever the schema's x-guidance.
JSON_OPTIONS: Any = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
    "whitespace_pattern": None,
    "coerce_one_of": False,
    "json_allow_general_unicode_escapes": False,
}
# Errors name the keyword or position, without the parser's state dump. The lexer's build
# fuel is a tenth of llguidance's default: with the default, the 15-character regex
# (a{1000}){1000} spent 2 s building its first mask and held 200 MB per cached format. (Its
# state count stays the default: copies of a cached format share one lexer, so a tighter
# cap would be spent across generations and fail a format that worked before.)
_LIMITS = llguidance.LLParserLimits(verbose_errors=False, initial_lexer_fuel=100_000)


Mask = npt.NDArray[np.bool_]


def _depth(value: Any) -> int:
    """Nesting of JSON objects and arrays (a scalar is 0), iteratively: a deep document must
    not exhaust the stack."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _lark_literal(text: str) -> str:
    """A Lark string literal of `text`: JSON's escapes, and DEL and the C1 controls (which
    JSON leaves raw and the grammar's lexer refuses) as \\u escapes."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(f"\\u{ord(c):04x}" if 0x7F <= ord(c) < 0xA0 else c for c in quoted)


def grammar_of(fmt: ResponseFormat) -> str:
    """The format as an llguidance grammar, with the documented limits checked first."""
    kind = fmt.kind
    if kind is FormatKind.JSON_OBJECT:
        return str(
            llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', overrides=JSON_OPTIONS
            )
        )
    if kind is FormatKind.CHOICE:
        return _choice_grammar(fmt.choices)
    text = fmt.value
    if not text:
        raise InvalidInputError(f"response_format.{kind.value} is empty")
    if kind is FormatKind.REGEX:
        if len(text) > MAX_REGEX_CHARS:
            raise InvalidInputError(
                f"response_format.regex is {len(text)} characters; at most {MAX_REGEX_CHARS}"
            )
        return str(llguidance.LLMatcher.grammar_from_regex(text))
    size = len(text.encode())
    if kind is FormatKind.LARK_GRAMMAR:
        if size > MAX_GRAMMAR_BYTES:
            raise InvalidInputError(
                f"response_format.lark_grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES}"
            )
        return str(llguidance.LLMatcher.grammar_from_lark(text))
    return _schema_grammar(text, size)


def _choice_grammar(choices: tuple[str, ...]) -> str:
    if not 1 <= len(choices) <= MAX_CHOICES:
        raise InvalidInputError(
            f"response_format.choice has {len(choices)} values; send 1 to {MAX_CHOICES}"
        )
    for index, choice in enumerate(choices):
        if not 1 <= len(choice) <= MAX_CHOICE_CHARS:
            raise InvalidInputError(
                f"response_format.choice.values[{index}] must be 1 to {MAX_CHOICE_CHARS} "
                f"characters, got {len(choice)}"
            )
    alternatives = " | ".join(_lark_literal(choice) for choice in choices)
    return str(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"))


def _schema_grammar(text: str, size: int) -> str:
    if size > MAX_SCHEMA_BYTES:
        raise InvalidInputError(
            f"response_format.json_schema is {size} bytes; at most {MAX_SCHEMA_BYTES}"
        )
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"response_format.json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidInputError(
            "response_format.json_schema must be a JSON object (a schema), got "
            f"{type(schema).__name__}"
        )
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidInputError(
            f"response_format.json_schema nests {depth} levels; at most {MAX_SCHEMA_DEPTH}"
        )
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))
    except ValueError as exc:
        raise InvalidInputError(f"response_format.json_schema: {exc}") from None


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each token's bytes (padded to the model's
    vocabulary size), the specials, and a tokenize function for the grammar's literal text."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        spelled: tuple[list[bytes], set[int]],
        eos: int | None,
        bos: int | None,
        size: int,
    ) -> None:
        tokens, special = spelled
        # Ids past the tokenizer (a padded embedding table) have no text: never allowed.
        self.tokens = tokens + [b""] * (size - len(tokens))
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos
        self.bos_token_id = bos
        self._tokenizer = tokenizer
        # Lowest id first, byte tokens (<0xNN>) last: the pieces the tokenizer itself uses.
        self._ids: dict[bytes, int] = {}
        for single in (False, True):
            for i, t in enumerate(tokens):
                if t and i not in special and (len(t) == 1) == single:
                    self._ids.setdefault(t, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str) -> list[int]:
        """Ids whose bytes are exactly `text`'s. The tokenizer's own encoding, unless it adds
        bytes (a SentencePiece normalizer prepends "▁"): then the longest tokens that
        spell the text, left to right."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        wanted = text.encode()
        if b"".join(self.tokens[i] for i in ids) == wanted:
            return ids
        return self._greedy(wanted)

    def _greedy(self, data: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                found = self._ids.get(data[at : at + size])
                if found is not None:
                    ids.append(found)
                    at += size
                    break
            else:  # a byte no token spells (no byte fallback): what can be spelled
                at += 1
        return ids


def _message(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error text, without its non-verbose marker, bounded."""
    return str(matcher.get_error()).replace("<non-verbose/>", "").strip()[:_MESSAGE_CHARS]


class Constraint:
    """One generation's format: which tokens may come next, fed each token chosen.

    `compute` may run on another thread while the decode step runs (it reads only the
    tokens already consumed); `allowed` and `consume` run on the model thread after it.
    `failed` is called once if the engine gives up on the format mid-way (it then leaves
    the cache, so the next call compiles it afresh).
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, failed: Callable[[], None]
    ) -> None:
        self._matcher = matcher
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._fresh = False
        self._error: InvalidInputError | None = None
        self._failed = failed
        self.tokens = 0  # consumed so far

    def compute(self) -> None:
        """Fill the next token's mask (llguidance drops the GIL while it works)."""
        if self._fresh:
            return
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            self._error = self._gave_up()
        self._fresh = True

    def _gave_up(self) -> InvalidInputError:
        """The engine hit one of its bounds on this format: the caller's format, not a fault."""
        self._failed()
        return InvalidInputError(
            f"the response format could not be followed after {self.tokens} tokens: "
            f"{_message(self._matcher)}"
        )

    def allowed(self, width: int) -> Mask:
        """The tokens (of `width` logits) that may come next."""
        self.compute()
        if self._error is not None:
            raise self._error
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(np.bool_)
        if bits.size < width:  # logits past the vocabulary: ids with no text
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=np.bool_)])
        mask: Mask = bits[:width]
        if not mask.any():
            raise InvalidInputError(
                f"no token of the model's vocabulary can continue the response format after "
                f"{self.tokens} tokens"
            )
        return mask

    def consume(self, token: int) -> None:
        """Follow the chosen token (one `allowed` let through)."""
        self._fresh = False
        self.tokens += 1
        if not self._matcher.consume_token(token):
            # The mask let it through, so the engine gave up on the format (a bound of its
            # own, such as the lexer's): logged, since a fault would look the same.
            log.warning("a token the mask allowed was refused: %s", _message(self._matcher))
            raise self._gave_up()

    @property
    def accepting(self) -> bool:
        """The reply so far is a complete one (it may end here)."""
        return bool(self._matcher.is_accepting())

    @property
    def complete(self) -> bool:
        """Nothing may follow the reply so far but the end."""
        return bool(self._matcher.is_stopped())


def compute_all(constraints: Sequence[Constraint]) -> None:
    """Each constraint's next mask; a failure stays with its generation (raised by allowed)."""
    for constraint in constraints:
        try:
            constraint.compute()
        except PROPAGATE:
            raise
        except BaseException:  # a panic in the engine: allowed() computes again and raises
            log.exception("computing a token mask failed")


class Grammars:
    """One model's compiled formats; thread-safe."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: Sequence[int],
        vocab_size: int,
        bos_token_id: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._bos = bos_token_id
        self._vocab_size = vocab_size
        self._llg: llguidance.LLTokenizer | None = None
        self._refused: WrongTaskError | None = None  # a vocabulary no grammar can match
        self._compiled: OrderedDict[ResponseFormat, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _vocabulary(self) -> llguidance.LLTokenizer:
        """The token table, built once (about half a second for a 49k vocabulary)."""
        with self._lock:
            if self._refused is not None:
                raise self._refused
            if self._llg is None:
                try:
                    spelled = token_bytes(self._tokenizer.to_str())
                except WrongTaskError as exc:
                    self._refused = exc
                    raise
                size = self._vocab_size = max(self._vocab_size, len(spelled[0]))
                eos = self._eos[0] if self._eos else None
                vocabulary = _Vocabulary(self._tokenizer, spelled, eos, self._bos, size)
                self._llg = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(vocabulary), eos_token=self._eos or None
                )
            return self._llg

    def constraint(self, fmt: ResponseFormat) -> Constraint:
        """A fresh constraint for one generation; InvalidInputError if the format is bad."""
        vocabulary = self._vocabulary()
        with self._lock:
            template = self._compiled.get(fmt)
            if template is not None:
                self._compiled.move_to_end(fmt)
        if template is None:
            template = self._compile(fmt, vocabulary)
            with self._lock:
                self._compiled[fmt] = template
                while len(self._compiled) > CACHE_ENTRIES:
                    self._compiled.popitem(last=False)
        forget = functools.partial(self._forget, fmt, template)
        return Constraint(template.deep_copy(), self._vocab_size, forget)

    def _forget(self, fmt: ResponseFormat, template: llguidance.LLMatcher) -> None:
        """Drop a format the engine gave up on (not one compiled afresh since)."""
        with self._lock:
            if self._compiled.get(fmt) is template:
                del self._compiled[fmt]

    @property
    def cached(self) -> int:
        """Compiled formats held."""
        return len(self._compiled)

    def _compile(self, fmt: ResponseFormat, vocabulary: llguidance.LLTokenizer) -> Any:
        grammar = grammar_of(fmt)
        try:
            matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0, limits=_LIMITS)
            if not matcher.is_error():
                # The first mask here, on the tokenizing pool: a format the engine cannot
                # start (a $ref that refers only to itself) fails before any decoding.
                matcher.compute_bitmask()
        except PROPAGATE:
            raise
        except BaseException as exc:  # the engine refused it outright (or panicked)
            log.warning("compiling a %s format failed: %r", fmt.kind.value, exc)
            raise InvalidInputError(
                f"response_format.{fmt.kind.value} could not be compiled: {exc}"
            ) from None
        if matcher.is_error():
            message = _message(matcher)
            if message.startswith("NoExtension"):  # the engine's stop reason, no more
                message = "no reply can satisfy it (a $ref that refers only to itself?)"
            raise InvalidInputError(f"response_format.{fmt.kind.value} is not valid: {message}")
        return matcher

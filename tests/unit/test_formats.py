"""Response formats without a server: each vocabulary's token bytes, the documented limits,
the engine's refusals, the compiled-format cache, and constrained walks over random logits
that always end in a reply the format accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from sidecar.domain import FormatKind, ResponseFormat
from sidecar.errors import InvalidInputError, WrongTaskError
from sidecar.generation import formats
from sidecar.generation.token_bytes import SPECIAL_MARKER, token_bytes
from tests.checkpoints import CORPUS, train_bpe_tokenizer, train_tokenizer

EOS = "<|endoftext|>"
TEXTS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A GPT-2 style byte-level BPE."""
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(out, [EOS])
    return Tokenizer.from_file(str(out / "raw-tokenizer.json"))


@pytest.fixture(scope="module")
def gguf_style(byte_level: Tokenizer) -> Tokenizer:
    """The same vocabulary with the decoder transformers writes when it converts SmolLM2's
    GGUF file: ByteFallback, Fuse, Replace("▁", " ") and ByteLevel in one sequence. A reader
    that goes by the decoder's first entry takes it for SentencePiece and misreads every
    byte-level token ("Ġ" as two bytes instead of a space)."""
    spec = json.loads(byte_level.to_str())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def sentencepiece_style() -> Tokenizer:
    """A Llama-2 style BPE: "▁" for spaces, <0xNN> tokens for bytes outside the vocabulary."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.train_from_iterator(
        [line.replace(" ", "▁") for line in CORPUS] * 4,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def unigram_style() -> Tokenizer:
    """A T5 / Marian style Unigram with Metaspace (its vocabulary is a list of pieces)."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        CORPUS * 4,
        trainers.UnigramTrainer(
            vocab_size=200,
            special_tokens=["<pad>", "</s>", "<unk>"],
            unk_token="<unk>",
            initial_alphabet=list('{}[]":,0123456789abcdefghijklmnopqrstuvwxyz'),
        ),
    )
    return tokenizer


def spelled(tokenizer: Tokenizer, text: str) -> bytes:
    tokens, _ = token_bytes(tokenizer.to_str())
    return b"".join(tokens[i] for i in tokenizer.encode(text, add_special_tokens=False).ids)


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_byte_level_tokens_spell_the_text(byte_level: Tokenizer, text: str) -> None:
    assert spelled(byte_level, text) == text.encode()


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_a_gguf_converted_byte_level_vocabulary_is_read_as_byte_level(
    gguf_style: Tokenizer, text: str
) -> None:
    assert spelled(gguf_style, text) == text.encode()


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_sentencepiece_tokens_spell_the_text_with_its_leading_space(
    sentencepiece_style: Tokenizer, text: str
) -> None:
    assert spelled(sentencepiece_style, text) == ((" " + text).encode() if text else b"")


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.sampled_from("abcdefghij klmnop"), min_size=1, max_size=30))
def test_unigram_tokens_spell_the_text_with_its_leading_space(
    unigram_style: Tokenizer, text: str
) -> None:
    words = " ".join(text.split())  # Metaspace splits on spaces: runs of them read as one
    if words:
        assert spelled(unigram_style, words) == (" " + words).encode()


def test_special_tokens_are_marked_so_no_text_spells_them(byte_level: Tokenizer) -> None:
    tokens, special = token_bytes(byte_level.to_str())
    eos = byte_level.token_to_id(EOS)
    assert special == {eos}
    assert tokens[eos] == SPECIAL_MARKER + EOS.encode()


def test_a_wordpiece_vocabulary_is_refused_by_name(tmp_path: Path) -> None:
    train_tokenizer(tmp_path)
    with pytest.raises(WrongTaskError, match="WordPiece tokenizer writes no spaces"):
        token_bytes((tmp_path / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def grammars(byte_level: Tokenizer) -> formats.Grammars:
    eos = byte_level.token_to_id(EOS)
    return formats.Grammars(byte_level, [eos], byte_level.get_vocab_size())


def schema(value: object) -> ResponseFormat:
    return ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(value))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (ResponseFormat(FormatKind.JSON_SCHEMA, "{"), "json_schema is not valid JSON"),
        (ResponseFormat(FormatKind.JSON_SCHEMA, "[1]"), "must be a JSON object .* got list"),
        (ResponseFormat(FormatKind.JSON_SCHEMA, ""), "json_schema is empty"),
        (schema({"type": "array", "uniqueItems": True}), r'Unimplemented keys: \["uniqueItems"\]'),
        (schema({"type": "strin"}), "Invalid type: strin"),
        (schema({"type": "string", "format": "bogus"}), "Unknown format: bogus"),
        (schema({"$ref": "#/$defs/missing"}), "does not exist"),
        (schema({"type": "string", "pattern": "(["}), "unclosed character class"),
        (
            schema(
                {
                    "properties": {"a": {"type": "string"}},
                    "x-guidance": {"lenient": True},
                    "not": {},
                }
            ),
            r'Unimplemented keys: \["not"\]',
        ),
        (
            schema(
                {
                    "oneOf": [{"type": "integer"}, {"type": "number"}],
                    "x-guidance": {"coerce_one_of": True},
                }
            ),
            "oneOf constraints are not supported",
        ),
        (
            schema({"a": "x" * formats.MAX_SCHEMA_BYTES}),
            "json_schema is 655.. bytes; at most 65536",
        ),
        (schema(json.loads("[" * 40 + "]" * 40)), "must be a JSON object"),
        (
            schema({"items": json.loads('{"items": ' * 40 + "{}" + "}" * 40)}),
            "json_schema nests 42 levels; at most 32",
        ),
        (ResponseFormat(FormatKind.REGEX, "(ab"), "(?s)regex is not valid: .*unclosed group"),
        (ResponseFormat(FormatKind.REGEX, "a" * 5000), "regex is 5000 characters; at most 4096"),
        (ResponseFormat(FormatKind.CHOICE), "choice has 0 values; send 1 to 256"),
        (ResponseFormat(FormatKind.CHOICE, choices=("a", "")), r"values\[1\] must be 1 to 1024"),
        (ResponseFormat(FormatKind.CHOICE, choices=("a",) * 257), "choice has 257 values"),
        (ResponseFormat(FormatKind.LARK_GRAMMAR, "start: x"), 'unknown name: "x"'),
    ],
)
def test_bad_formats_are_refused_naming_the_keyword_or_position(
    grammars: formats.Grammars, fmt: ResponseFormat, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        grammars.constraint(fmt)


def test_compiled_formats_are_cached_and_the_least_recently_used_dropped(
    byte_level: Tokenizer,
) -> None:
    grammars = formats.Grammars(byte_level, [byte_level.token_to_id(EOS)], 0)

    def regex(n: int) -> ResponseFormat:
        return ResponseFormat(FormatKind.REGEX, f"x{{{n}}}")

    kept = ResponseFormat(FormatKind.REGEX, "[a-z]{1,3}")
    grammars.constraint(kept)
    grammars.constraint(kept)
    assert grammars.cached == 1
    for n in range(1, formats.CACHE_ENTRIES + 5):
        grammars.constraint(regex(n))
        grammars.constraint(kept)  # used all along: never the least recent
    assert grammars.cached == formats.CACHE_ENTRIES
    held = grammars._compiled  # the cache's own keys: which formats it kept
    assert kept in held
    assert regex(1) not in held
    assert regex(formats.CACHE_ENTRIES + 4) in held


def test_a_vocabulary_no_grammar_can_use_is_refused_every_time(tmp_path: Path) -> None:
    train_tokenizer(tmp_path)
    grammars = formats.Grammars(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), [2], 0)
    for _ in range(2):
        with pytest.raises(WrongTaskError, match="WordPiece"):
            grammars.constraint(ResponseFormat(FormatKind.JSON_OBJECT))


def test_formats_the_engine_cannot_start_are_refused_before_decoding(
    grammars: formats.Grammars,
) -> None:
    looping = {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}
    with pytest.raises(InvalidInputError, match="no reply can satisfy it"):
        grammars.constraint(schema(looping))


def walk(
    grammars: formats.Grammars,
    fmt: ResponseFormat,
    tokenizer: Tokenizer,
    seed: int,
    width: int = 0,
    eos: str = EOS,
) -> tuple[str, bool]:
    """Sample a reply from random logits (`width` of them: the tokenizer's vocabulary by
    default) under the format; the text and whether it ended where the format allows (EOS
    while accepting, or complete)."""
    eos_id = tokenizer.token_to_id(eos)
    constraint = grammars.constraint(fmt)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for _ in range(600):
        allowed = constraint.allowed(width or tokenizer.get_vocab_size())
        logits = rng.normal(size=allowed.size).astype(np.float32)
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        if token == eos_id:
            return tokenizer.decode(ids), constraint.accepting
        constraint.consume(token)
        ids.append(token)
        if constraint.complete:
            return tokenizer.decode(ids), True
    return tokenizer.decode(ids), False


BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["billing", "login", "bug"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 12},
        "ticket": {"type": "string", "pattern": "^T-[0-9]{3}$"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["category", "priority"],
    "additionalProperties": False,
}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_walks_under_a_schema_end_in_valid_json(
    grammars: formats.Grammars, byte_level: Tokenizer, seed: int
) -> None:
    text, ended = walk(grammars, schema(BOUNDED_SCHEMA), byte_level, seed)
    assert ended, text
    jsonschema.validate(json.loads(text), BOUNDED_SCHEMA)
    assert ", " in text or len(json.loads(text)) == 1


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    choices=st.lists(TEXTS.filter(bool), min_size=1, max_size=5, unique=True),
)
def test_random_walks_under_choices_end_in_one_of_them(
    grammars: formats.Grammars, byte_level: Tokenizer, seed: int, choices: list[str]
) -> None:
    text, ended = walk(
        grammars, ResponseFormat(FormatKind.CHOICE, choices=tuple(choices)), byte_level, seed
    )
    assert ended
    assert text in choices


@pytest.mark.parametrize(
    "pattern", [r"[A-Z]{2}-[0-9]{4}", r"(low|medium|high)", r"[0-9]{1,3}(\.[0-9]{1,2})?"]
)
def test_random_walks_under_a_regex_end_in_a_match(
    grammars: formats.Grammars, byte_level: Tokenizer, pattern: str
) -> None:
    for seed in range(10):
        text, ended = walk(grammars, ResponseFormat(FormatKind.REGEX, pattern), byte_level, seed)
        assert ended
        assert re.fullmatch(pattern, text), text


def test_a_padded_vocabulary_masks_the_ids_past_the_tokenizer(byte_level: Tokenizer) -> None:
    """A model whose embedding table is wider than its tokenizer (Qwen2, Phi-2): the extra
    ids have no text and are never allowed."""
    width = byte_level.get_vocab_size() + 100
    padded = formats.Grammars(byte_level, [byte_level.token_to_id(EOS)], width)
    for seed in range(5):
        text, ended = walk(padded, schema(BOUNDED_SCHEMA), byte_level, seed, width=width)
        assert ended
        jsonschema.validate(json.loads(text), BOUNDED_SCHEMA)
    constraint = padded.constraint(schema(BOUNDED_SCHEMA))
    assert not constraint.allowed(width)[byte_level.get_vocab_size() :].any()


@pytest.mark.parametrize("vocabulary", ["sentencepiece_style", "gguf_style", "unigram_style"])
def test_walks_on_every_vocabulary_kind_end_in_valid_replies(
    vocabulary: str, request: pytest.FixtureRequest
) -> None:
    """Forced text (choice literals, required keys) is tokenized to exactly its bytes, even
    where the tokenizer prepends a space."""
    tokenizer: Tokenizer = request.getfixturevalue(vocabulary)
    eos = "</s>" if vocabulary != "gguf_style" else EOS
    grammars = formats.Grammars(tokenizer, [tokenizer.token_to_id(eos)], 0)
    simple = {
        "type": "object",
        "properties": {
            "category": {"enum": ["billing", "bug"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["category", "n"],
        "additionalProperties": False,
    }
    for seed in range(8):
        text, ended = walk(grammars, schema(simple), tokenizer, seed, eos=eos)
        assert ended, text
        jsonschema.validate(json.loads(text.strip()), simple)
        choice = ResponseFormat(FormatKind.CHOICE, choices=("billing", "login", "bug"))
        text, ended = walk(grammars, choice, tokenizer, seed, eos=eos)
        assert ended
        assert text.strip() in choice.choices


def test_a_schemas_own_whitespace_pattern_does_not_loosen_the_layout(
    grammars: formats.Grammars, byte_level: Tokenizer
) -> None:
    loose = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "maxItems": 4,
        "x-guidance": {"whitespace_pattern": "[\\n ]+"},
    }
    for seed in range(10):
        text, ended = walk(grammars, schema(loose), byte_level, seed)
        assert ended
        assert text == json.dumps(json.loads(text))  # ", " between items and nothing else

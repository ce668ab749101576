"""tokenizer.json in every model dir: the sidecar tokenizes with the `tokenizers` library only.

optimum and transformers write it for checkpoints that have a fast tokenizer. transformers
has none for Marian (its MarianTokenizer runs SentencePiece with a vocabulary of its own), so
one is built here from the checkpoint's source.spm and vocab.json; export validation then
checks that it gives the slow tokenizer's ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import ExportError
from sidecar.tasks.tokenization import TOKENIZER_FILE

# How far below the source model's pieces a target-only piece of one character scores, and
# how much lower still one of several characters scores than its characters one by one.
_TARGET_ONLY_MARGIN = 100.0


def _tokenizer_class(source: Path) -> str:
    path = source / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return str(config.get("tokenizer_class") or "")


def ensure(source: Path, out: Path, *, trust_remote_code: bool) -> None:
    """Leave out/tokenizer.json for the checkpoint's tokenizer; ExportError if none can be made."""
    target = out / TOKENIZER_FILE
    if target.is_file():
        return
    if (source / "source.spm").is_file() and (source / "vocab.json").is_file():
        marian(source).save(str(target))
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, use_fast=True, trust_remote_code=trust_remote_code
        )
    except ImportError as exc:
        raise ExportError(
            f"{source}: its tokenizer needs a package that is not installed ({exc}): install "
            "the export extra, pip install 'transformers-sidecar[export]'"
        ) from None
    if not tokenizer.is_fast:
        kind = _tokenizer_class(source) or type(tokenizer).__name__
        raise ExportError(
            f"{source}: transformers has no fast tokenizer for {kind}, and the sidecar "
            "tokenizes with tokenizer.json: add a tokenizer.json to the checkpoint (saved by "
            "a fast tokenizer of the same vocabulary)"
        )
    tokenizer.backend_tokenizer.save(str(target))


def _spm_scores(model: Path) -> dict[str, float]:
    """Piece -> score of a SentencePiece model file."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return {
        processor.id_to_piece(i): float(processor.get_score(i))
        for i in range(processor.get_piece_size())
    }


def marian(source: Path) -> Any:
    """A `tokenizers` Tokenizer that encodes as MarianTokenizer: the source SentencePiece
    model's segmentation, vocab.json's ids, and </s> after every text."""
    from tokenizers import AddedToken, processors

    try:
        from transformers import MarianTokenizer
        from transformers.convert_slow_tokenizer import SpmConverter

        slow = MarianTokenizer.from_pretrained(source)
    except ImportError as exc:
        raise ExportError(
            f"{source} has a SentencePiece (Marian) tokenizer, which needs the sentencepiece "
            f"package ({exc}): install the export extra, pip install "
            "'transformers-sidecar[export]'"
        ) from None
    if slow.separate_vocabs:
        raise ExportError(
            f"{source}: a Marian tokenizer with separate source and target vocabularies "
            "(target_vocab.json) is not supported; the sidecar decodes with one vocabulary"
        )
    ids: dict[str, int] = slow.encoder
    if sorted(ids.values()) != list(range(len(ids))):
        raise ExportError(f"{source}/vocab.json does not number its tokens 0 to {len(ids) - 1}")
    order = sorted(ids, key=lambda token: ids[token])
    source_scores = _spm_scores(source / "source.spm")
    # MarianTokenizer segments with the source model only and then looks the pieces up in the
    # shared vocab.json, so a piece only the target side has is never produced, except a
    # single character the source model lacks (its surface is looked up). Scores below any
    # segmentation into the source's own pieces, and a multi-character one below its
    # characters taken one by one, keep the Unigram lattice to those choices.
    single = min(source_scores.values()) - _TARGET_ONLY_MARGIN

    def _target_only(token: str) -> float:
        return single if len(token) == 1 else len(token) * single - _TARGET_ONLY_MARGIN

    class MarianConverter(SpmConverter):
        """SentencePiece's normalizer and pre-tokenizer, with vocab.json's numbering."""

        def __init__(self, original: Any) -> None:
            # The source side's model segments the inputs.
            original.vocab_file = original.spm_files[0]
            super().__init__(original)

        def vocab(self, proto: Any) -> list[tuple[str, float]]:
            return [(token, source_scores.get(token, _target_only(token))) for token in order]

        def unk_id(self, proto: Any) -> int:
            return ids[slow.unk_token]

        def post_processor(self) -> Any:
            eos = slow.eos_token
            return processors.TemplateProcessing(
                single=["$A", eos], pair=["$A", "$B", eos], special_tokens=[(eos, ids[eos])]
            )

    tokenizer = MarianConverter(slow).converted()
    specials = [slow.eos_token, slow.unk_token, slow.pad_token]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # Target-language codes (>>fra<<) are single tokens that MarianTokenizer reads whole.
    codes = slow.supported_language_codes
    tokenizer.add_tokens([AddedToken(code, normalized=False) for code in codes])
    return tokenizer

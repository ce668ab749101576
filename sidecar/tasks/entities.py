"""Token labels to entities, with the semantics of transformers' token-classification pipeline.

Word pieces are found through the tokenizer's offsets and token strings, never by
re-tokenizing: a token is a continuation of the previous word when the tokenizer marks
continuations (WordPiece's "##") and its string differs in length from the text it covers,
or, for tokenizers without such a mark, when no space separates it from what comes before.
Aggregation then follows the pipeline: none (each token), simple (adjacent tokens of one
type merged), first / average / max (each word takes one label from its pieces' scores,
then adjacent words of one type merge). Entities labelled "O" are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.domain import (
    CallInfo,
    Entity,
    EntityList,
    ExtractEntitiesRequest,
    ExtractEntitiesResult,
)
from sidecar.errors import InvalidInputError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks.base import (
    EncoderTask,
    InputLimits,
    Prepared,
    Rows,
    TaskModel,
    check_labels,
    each_text,
    output,
)
from sidecar.tasks.checks import check_inputs
from sidecar.tasks.tokenization import EncodedBatch, EncodedText

STRATEGIES = ("none", "simple", "first", "average", "max")
OUTSIDE = "O"


@dataclass(frozen=True)
class _Piece:
    """One labelled token or word: its label, score and span."""

    label: str
    score: float
    start: int
    end: int


@dataclass(frozen=True)
class _Token:
    scores: npt.NDArray[np.float32]
    start: int
    end: int
    subword: bool


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per-token label probabilities, as the pipeline computes them."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: npt.NDArray[np.float32] = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def _tokens(
    text: str,
    scores: npt.NDArray[np.float32],
    item: EncodedText,
    subword_prefix: str | None,
    unk_id: int | None,
) -> list[_Token]:
    tokens = []
    for index, (start, end) in enumerate(item.offsets):
        if item.special[index]:
            continue
        if subword_prefix:
            subword = len(item.tokens[index]) != end - start
        else:
            subword = start > 0 and " " not in text[start - 1 : start + 1]
        if unk_id is not None and item.ids[index] == unk_id:
            subword = False
        tokens.append(_Token(scores[index], start, end, subword))
    return tokens


def _word(pieces: list[_Token], strategy: str, labels: Sequence[str]) -> _Piece:
    if strategy == "first":
        scores = pieces[0].scores
    elif strategy == "max":
        scores = max(pieces, key=lambda t: float(t.scores.max())).scores
    else:  # average
        scores = np.mean(np.stack([t.scores for t in pieces]), axis=0)
    best = int(np.argmax(scores))
    return _Piece(labels[best], float(scores[best]), pieces[0].start, pieces[-1].end)


def _words(tokens: list[_Token], strategy: str, labels: Sequence[str]) -> list[_Piece]:
    words: list[_Piece] = []
    group: list[_Token] = []
    for token in tokens:
        if group and not token.subword:
            words.append(_word(group, strategy, labels))
            group = []
        group.append(token)
    if group:
        words.append(_word(group, strategy, labels))
    return words


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", type): an unprefixed label counts as inside an entity of its own name."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _merge(pieces: list[_Piece]) -> list[_Piece]:
    """Adjacent pieces of one type become one entity (a B- starts a new one); mean score."""
    groups: list[list[_Piece]] = []
    for piece in pieces:
        begin, kind = _tag(piece.label)
        if groups and kind == _tag(groups[-1][-1].label)[1] and begin != "B":
            groups[-1].append(piece)
        else:
            groups.append([piece])
    # The group is named as the pipeline names it: the label after its first "-"
    # ("E-PER" and "S-PER" of BIOES schemes too).
    return [
        _Piece(
            group[0].label.split("-", 1)[-1],
            float(np.mean([p.score for p in group])),
            group[0].start,
            group[-1].end,
        )
        for group in groups
    ]


def extract(
    text: str,
    scores: npt.NDArray[np.float32],
    item: EncodedText,
    labels: Sequence[str],
    strategy: str,
    subword_prefix: str | None,
    unk_id: int | None,
) -> list[Entity]:
    """Entities of one input from its per-token label probabilities ([tokens, labels]).

    `item` is the input encoded with offsets (TextEncoder.encode_each(with_offsets=True)).
    """
    tokens = _tokens(text, scores, item, subword_prefix, unk_id)
    if strategy in ("none", "simple"):
        pieces = []
        for token in tokens:
            best = int(np.argmax(token.scores))
            pieces.append(_Piece(labels[best], float(token.scores[best]), token.start, token.end))
        if strategy == "simple":
            pieces = _merge(pieces)
    else:
        pieces = _merge(_words(tokens, strategy, labels))
    return [
        Entity(p.label, p.score, p.start, p.end, text[p.start : p.end])
        for p in pieces
        if p.label != OUTSIDE
    ]


class EntitiesTask(EncoderTask[ExtractEntitiesRequest, ExtractEntitiesResult]):
    """Entities in each of a batch of texts, from a token classifier."""

    task = Task.EXTRACT_ENTITIES
    rpc = "ExtractEntities"
    request_type = ExtractEntitiesRequest

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        check_labels(model_dir, manifest)

    def check(self, request: ExtractEntitiesRequest, limits: InputLimits) -> None:
        check_inputs(request.inputs, limits.max_inputs)
        if request.aggregation not in STRATEGIES:
            raise InvalidInputError(
                f"aggregation {request.aggregation!r} is not one of {', '.join(STRATEGIES)}"
            )

    def prepare(
        self, model: TaskModel, request: ExtractEntitiesRequest, limits: InputLimits
    ) -> Prepared:
        return each_text(model, request.inputs, truncate=request.truncate, with_offsets=True)

    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, Rows],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> Rows:
        # Label probabilities per token, padded to the model's max length so every batch's
        # rows have one shape; each input's own tokens are read back by length.
        probs = softmax(output(outputs, "logits").astype(np.float32))
        rows = np.zeros((len(items), model.encoder.max_length, probs.shape[-1]), np.float32)
        rows[:, : probs.shape[1]] = probs
        return rows

    def finish(
        self,
        model: TaskModel,
        rows: Rows,
        items: Sequence[EncodedText],
        request: ExtractEntitiesRequest,
        prepared: Prepared,
        info: CallInfo,
    ) -> ExtractEntitiesResult:
        encoder = model.encoder
        results = [
            EntityList(
                entities=extract(
                    text,
                    rows[i][: item.length],
                    item,
                    model.manifest.labels,
                    request.aggregation,
                    encoder.continuing_subword_prefix,
                    encoder.unk_id,
                ),
                token_count=item.length,
                truncated=item.truncated,
            )
            for i, (item, text) in enumerate(zip(items, request.inputs, strict=True))
        ]
        return ExtractEntitiesResult(results=results, info=info)


TASK = EntitiesTask()

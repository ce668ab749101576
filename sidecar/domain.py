"""Requests and results as plain dataclasses: what the dataplane takes and returns.

Protobuf stops at sidecar/grpc; everything below it speaks these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt

from sidecar.models.manifest import Manifest, Task


@dataclass(frozen=True)
class EmbedRequest:
    """Embed `inputs`; normalize None means the model's default."""

    model: str
    inputs: Sequence[str]
    normalize: bool | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ClassifyRequest:
    """Classify `inputs`; top_k 0 means every label. Candidate labels: zero-shot."""

    model: str
    inputs: Sequence[str]
    top_k: int = 0
    truncate: bool = True
    candidate_labels: Sequence[str] = ()
    hypothesis_template: str = ""  # "": "This example is {}."
    multi_label: bool = False


@dataclass(frozen=True)
class ExtractEntitiesRequest:
    """Find entities in `inputs`, merging word pieces by `aggregation`."""

    model: str
    inputs: Sequence[str]
    aggregation: str = "simple"  # none | simple | first | average | max
    truncate: bool = True


@dataclass(frozen=True)
class RerankRequest:
    """Score `inputs` (passages) against `query`; top_n 0 means all."""

    model: str
    query: str
    inputs: Sequence[str]
    top_n: int = 0
    return_text: bool = False
    truncate: bool = True


@dataclass(frozen=True)
class TokenizeRequest:
    """Tokenize `inputs` with the model's tokenizer."""

    model: str
    inputs: Sequence[str]
    add_special_tokens: bool = True
    truncate: bool = False


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn."""

    role: str
    content: str


class FormatKind(Enum):
    """The kinds of ResponseFormat, named as the contract's fields."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    LARK_GRAMMAR = "lark_grammar"


@dataclass(frozen=True)
class ResponseFormat:
    """The form a reply must take: `value` holds the schema, regex or grammar text."""

    kind: FormatKind
    value: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """Generate from `prompt` or chat `messages`; None means the model's default."""

    model: str
    prompt: str = ""
    messages: Sequence[ChatMessage] = ()
    max_new_tokens: int = 0  # 0: the model's default
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    truncate: bool = True  # cut an over-long prompt (see Prompt) instead of refusing it
    response_format: ResponseFormat | None = None  # None: free text


class FinishReason(Enum):
    """Why a generation ended."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    COMPLETE = "complete"  # the reply completed its response format


@dataclass(frozen=True)
class Usage:
    """Token counts of a generation."""

    prompt_tokens: int  # tokens the model saw, after truncation
    completion_tokens: int
    truncated_prompt_tokens: int = 0  # tokens cut from the prompt to fit the context


@dataclass
class CallInfo:
    """Which model ran a call and where its time went (microseconds)."""

    model: str
    revision: str
    backend: str
    device: str
    queue_us: int = 0
    tokenize_us: int = 0
    inference_us: int = 0
    postprocess_us: int = 0
    batch_size: int = 0


@dataclass(frozen=True)
class Embedding:
    """One input's vector and what the model saw of it."""

    values: npt.NDArray[np.float32]
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings in input order."""

    embeddings: list[Embedding]
    dimensions: int
    info: CallInfo


@dataclass(frozen=True)
class LabelScore:
    """A label's probability."""

    label: str
    score: float
    id: int


@dataclass(frozen=True)
class Classification:
    """One input's labels, best first."""

    labels: list[LabelScore]
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class ClassifyResult:
    """Classifications in input order."""

    results: list[Classification]
    multi_label: bool
    info: CallInfo


@dataclass(frozen=True)
class Entity:
    """An entity: label, confidence, [start, end) in code points, and the text there."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class EntityList:
    """One input's entities, in order of appearance."""

    entities: list[Entity]
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class ExtractEntitiesResult:
    """Entities in input order."""

    results: list[EntityList]
    info: CallInfo


@dataclass(frozen=True)
class RankedPassage:
    """A passage's relevance to the query."""

    index: int
    score: float
    raw_score: float
    text: str
    truncated: bool


@dataclass(frozen=True)
class RerankResult:
    """Passages, most relevant first."""

    results: list[RankedPassage]
    info: CallInfo


@dataclass(frozen=True)
class Tokens:
    """One input's tokens with code-point offsets."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    truncated: bool


@dataclass(frozen=True)
class TokenizeResult:
    """Tokens in input order."""

    results: list[Tokens]
    max_length: int
    info: CallInfo


class ModelState(Enum):
    """Where a configured model is in its life."""

    LOADING = "loading"
    SERVING = "serving"
    FAILED = "failed"


@dataclass
class ModelStatus:
    """A configured model as ListModels / GetModel describe it."""

    name: str
    state: ModelState
    backend: str
    device: str
    manifest: Manifest | None = None
    error: str = ""
    task: Task | None = field(default=None)


@dataclass(frozen=True)
class GenerateChunk:
    """One decode step's output; the last one carries finish, usage and info."""

    text: str
    token_ids: list[int]
    finish: FinishReason | None = None
    usage: Usage | None = None
    info: CallInfo | None = None

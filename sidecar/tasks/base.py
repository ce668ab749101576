"""What an encoder task is: the four steps the dataplane runs for any of them.

A call goes `check` (the request alone, before a model is chosen), `prepare` (against the
chosen model: what to encode and how many batch rows it takes), then the model's batcher
runs the forward pass and `reduce` keeps one row per input from the graph's outputs, and
`finish` builds the answer from the call's own rows. `reduce` sees only the batch, never
the calls in it, so inputs of different calls share a forward pass; what differs per call
(normalize, top_k, candidates) waits for `finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from sidecar.domain import CallInfo
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks.tokenization import EncodedBatch, EncodedText, TextEncoder

Rows = npt.NDArray[np.float32]
Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(frozen=True)
class InputLimits:
    """The request-size settings a task checks against."""

    max_inputs: int  # max_client_batch_size
    max_passages: int  # max_rerank_passages
    max_rows: int  # max_queue_size: the most batch rows one call may queue


class TaskModel(Protocol):
    """What a task reads from the loaded model it runs on."""

    @property
    def name(self) -> str: ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def encoder(self) -> TextEncoder: ...


@dataclass(frozen=True)
class Prepared:
    """A call made ready for the batcher."""

    count: int  # batch rows the call takes
    encode: Callable[[], Sequence[EncodedText]]  # run on the tokenizing pool
    described: Sequence[str]  # the texts a trace may show with log_inputs
    # What prepare worked out that finish needs again (zero-shot: the candidate labels).
    extra: Sequence[str] = field(default=())


def each_text(
    model: TaskModel, texts: Sequence[str], *, truncate: bool, with_offsets: bool = False
) -> Prepared:
    """A call of one batch row per text, each encoded on its own."""
    return Prepared(
        len(texts),
        lambda: model.encoder.encode_each(texts, truncate=truncate, with_offsets=with_offsets),
        texts,
    )


def check_labels(model_dir: Path, manifest: Manifest) -> None:
    """A model whose rows are label scores needs the labels' names."""
    if not manifest.labels:
        raise ModelLoadError(f"{model_dir}: a {manifest.task.value} model needs labels")


def output(outputs: Mapping[str, Rows], name: str) -> Rows:
    """The named graph output, or the graph's only one when it names it differently."""
    found = outputs.get(name)
    return next(iter(outputs.values())) if found is None else found


class EncoderTask(ABC, Generic[Req, Res]):
    """One encoder task; a module per task defines one and the registry lists it."""

    task: Task  # the model task it runs on
    rpc: str  # the call that reaches it, named in errors ("Classify")
    request_type: type[Req]
    pairs = False  # encodes (text, text) pairs: the tokenizer's pair template is probed at load

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        """Raise ModelLoadError when a model dir cannot serve this task (at load time)."""

    @abstractmethod
    def check(self, request: Req, limits: InputLimits) -> None:
        """Refuse a request that no model could answer, before one is chosen."""

    @abstractmethod
    def prepare(self, model: TaskModel, request: Req, limits: InputLimits) -> Prepared:
        """What to encode for this call on this model; refuses what the model cannot do."""

    @abstractmethod
    def reduce(
        self,
        model: TaskModel,
        outputs: Mapping[str, Rows],
        batch: EncodedBatch,
        items: Sequence[EncodedText],
    ) -> Rows:
        """One row per input from a forward pass over a batch (on an inference thread)."""

    @abstractmethod
    def finish(
        self,
        model: TaskModel,
        rows: Rows,
        items: Sequence[EncodedText],
        request: Req,
        prepared: Prepared,
        info: CallInfo,
    ) -> Res:
        """The call's answer from its own rows."""


AnyTask = EncoderTask[Any, Any]

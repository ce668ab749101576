"""Every task, found by the model's task or by the request a call carries.

A new encoder task is a module defining an EncoderTask, listed here; the dataplane, the
servicers and the Stream dispatcher find it through this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.domain import GenerateRequest
from sidecar.errors import ModelLoadError
from sidecar.models.manifest import Manifest, Task
from sidecar.tasks import classify, embed, entities, generate, rerank, zero_shot
from sidecar.tasks.base import AnyTask, InputLimits

ENCODER_TASKS: tuple[AnyTask, ...] = (
    embed.TASK,
    classify.TASK,
    zero_shot.TASK,
    entities.TASK,
    rerank.TASK,
)


def _no_check(request: Any, limits: InputLimits) -> None:
    """Generation parameters are checked against the model's defaults when it starts."""


@dataclass(frozen=True)
class RequestKind:
    """What a request asks for: its call's name, the model tasks that answer it, its check."""

    rpc: str
    tasks: tuple[Task, ...]
    check: Callable[[Any, InputLimits], None]


GENERATE = RequestKind(generate.TASK.rpc, generate.TASK.tasks, _no_check)


def _kinds() -> dict[type, RequestKind]:
    kinds: dict[type, RequestKind] = {GenerateRequest: GENERATE}
    for handler in ENCODER_TASKS:
        known = kinds.get(handler.request_type)
        if known is None:
            # The first task listed for a request checks it (all of them check alike).
            kinds[handler.request_type] = RequestKind(handler.rpc, (handler.task,), handler.check)
        else:
            kinds[handler.request_type] = RequestKind(
                known.rpc, (*known.tasks, handler.task), known.check
            )
    return kinds


_KINDS = _kinds()
_BY_TASK = {handler.task: handler for handler in ENCODER_TASKS}


def kind_of(request: object) -> RequestKind:
    """The kind of a request, by its type."""
    return kind_for(type(request))


def kind_for(request_type: type) -> RequestKind:
    """The kind of the requests of a type."""
    return _KINDS[request_type]


def encoder_task(task: Task) -> AnyTask:
    """The encoder task a model of `task` runs."""
    return _BY_TASK[task]


def takes_pairs(task: Task) -> bool:
    """Whether a model of `task` encodes (text, text) pairs."""
    handler = _BY_TASK.get(task)
    return handler is not None and handler.pairs


def check_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Raise ModelLoadError when the model dir lacks what its task needs."""
    if manifest.task in generate.TASK.tasks:
        generate.TASK.check_manifest(model_dir, manifest)
    elif (handler := _BY_TASK.get(manifest.task)) is not None:
        handler.check_manifest(model_dir, manifest)
    else:  # pragma: no cover - every task is listed
        raise ModelLoadError(f"{model_dir}: no task serves {manifest.task.value} models")

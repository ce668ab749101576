"""Checks on request content that need no model: they fail fast with INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.errors import InvalidInputError

MAX_CANDIDATE_LABELS = 64


def check_inputs(
    inputs: Sequence[str],
    limit: int,
    field: str = "inputs",
    limit_name: str = "max_client_batch_size",
) -> None:
    """At least one input, at most `limit`, none empty or whitespace-only."""
    if not inputs:
        raise InvalidInputError(f"{field} is empty: send at least one text")
    if len(inputs) > limit:
        raise InvalidInputError(
            f"{len(inputs)} {field}, over {limit_name} {limit}: split the call "
            f"into calls of at most {limit}, or send them as Stream items"
        )
    for index, text in enumerate(inputs):
        if not text or text.isspace():
            raise InvalidInputError(
                f"{field}[{index}] is empty or whitespace-only: send text with at least "
                "one visible character"
            )


def check_non_negative(name: str, value: int) -> None:
    """A count parameter where 0 means 'no limit'."""
    if value < 0:
        raise InvalidInputError(f"{name} must be 0 (no limit) or positive, got {value}")


def check_candidates(candidates: Sequence[str], model: str) -> list[str]:
    """Zero-shot candidate labels: 1 to MAX_CANDIDATE_LABELS distinct, non-empty ones."""
    if not candidates:
        raise InvalidInputError(
            f"model {model!r} is a zero-shot model: set candidate_labels to the labels to "
            "choose from"
        )
    if len(candidates) > MAX_CANDIDATE_LABELS:
        raise InvalidInputError(
            f"{len(candidates)} candidate_labels; at most {MAX_CANDIDATE_LABELS} are allowed"
        )
    for index, label in enumerate(candidates):
        if not label.strip():
            raise InvalidInputError(f"candidate_labels[{index}] is empty")
    if len(set(candidates)) != len(candidates):
        raise InvalidInputError("candidate_labels has duplicates: each label must be unique")
    return list(candidates)

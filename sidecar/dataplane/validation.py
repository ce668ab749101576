"""Checks on request content that need no model: they fail fast with INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.errors import InvalidInputError


def check_inputs(inputs: Sequence[str], limit: int, field: str = "inputs") -> None:
    """At least one input, at most `limit`, none empty or whitespace-only."""
    if not inputs:
        raise InvalidInputError(f"{field} is empty: send at least one text")
    if len(inputs) > limit:
        raise InvalidInputError(
            f"{len(inputs)} {field}, over max_client_batch_size {limit}: split the call "
            f"into batches of at most {limit}, or send them as Stream items"
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

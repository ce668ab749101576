"""The interface of what runs a loaded model's work: one engine per model, built at load.

An encoder model's engine is its batcher (calls' inputs cut into shared forward passes), a
generative model's is its decode scheduler (steps of many generations run as one). Both
start their loop on first use, refuse work once closed, and fail what still waits when
closed, so the dataplane and shutdown treat them alike.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, TypeVar

Work = TypeVar("Work", contravariant=True)
Out = TypeVar("Out", covariant=True)


class Engine(Protocol[Work, Out]):
    """Runs one model's work."""

    @property
    def depth(self) -> int:
        """Work accepted and not yet started (an encoder model's queue_depth gauge)."""
        ...

    def submit(self, work: Work) -> Awaitable[Out]:
        """Accept work; the awaitable gives its result. Raises ModelNotReadyError once closed."""
        ...

    async def close(self) -> None:
        """Refuse new work and fail what waits or runs."""
        ...

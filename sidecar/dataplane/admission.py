"""Admission of new calls, and the count of calls in flight, for graceful shutdown.

On SIGTERM the server keeps listening: health answers NOT_SERVING, new calls are refused
here with UNAVAILABLE and a message (not a connection error a client cannot tell from a
crash), and calls already in flight, open streams included, run to the end of the grace
period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sidecar.errors import ModelNotReadyError, OverloadedError


class Admission:
    """Admits calls until draining starts; tells when none is left in flight."""

    def __init__(self) -> None:
        self._active = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Calls in flight."""
        return self._active

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Hold one admission for the duration of a call; refused once draining."""
        if self._draining:
            raise ModelNotReadyError(
                "the sidecar is shutting down and takes no new calls; retry on another instance"
            )
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    def drain(self) -> None:
        """Refuse every new call from now on."""
        self._draining = True

    async def wait_idle(self, within: float) -> bool:
        """Wait until no call is in flight; False if `within` seconds pass first."""
        if not self._active:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), within)
        except TimeoutError:
            return False
        return True


class InFlightLimit:
    """Work in progress counted against a setting; past it, RESOURCE_EXHAUSTED at once."""

    def __init__(self, limit: int, noun: str, setting: str) -> None:
        self.limit = limit
        self.running = 0
        self._noun = noun  # "requests", "generations"
        self._setting = setting

    @contextmanager
    def held(self) -> Iterator[None]:
        """One unit of work for the duration of the block."""
        if self.running >= self.limit:
            raise OverloadedError(
                f"{self.running} {self._noun} are in progress, the {self._setting} limit: "
                "retry with backoff, or add sidecar replicas"
            )
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

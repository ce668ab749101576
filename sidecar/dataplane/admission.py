"""Admission of new calls, and the count of calls in flight, for graceful shutdown.

On SIGTERM the server keeps listening: health answers NOT_SERVING, new calls are refused
here with UNAVAILABLE and a message (not a connection error a client cannot tell from a
crash), and calls already in flight, open streams included, run to the end of the grace
period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.errors import ModelNotReadyError


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

"""Step-by-step progress on stderr, so a long export never looks hung."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints "[i/n] step ... done in 1.2s" lines."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr

    def note(self, message: str) -> None:
        """A line inside the current step: a decision the user should know about."""
        print(f"[{self.done}/{self.total}] {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Announce a step, time it, and report how it ended."""
        self.done += 1
        print(f"[{self.done}/{self.total}] {what} ...", file=self.stream, flush=True)
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            print(f"[{self.done}/{self.total}] {what}: failed", file=self.stream, flush=True)
            raise
        print(
            f"[{self.done}/{self.total}] {what}: done in {time.perf_counter() - started:.1f}s",
            file=self.stream,
            flush=True,
        )

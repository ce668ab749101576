"""Streamed text: token ids in, text deltas out, held back where a stop sequence may begin.

Byte-level tokens can split a character across tokens, and merged tokens change how earlier
ones read; tokenizers' DecodeStream yields text only once it is final, so the deltas always
join to the decoded text of the whole generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """One generation's text so far; `push` each token, `finish` once at the end."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stops = tuple(stops)
        self._ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` handed out as deltas
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text this token makes final; sets `stopped` when a stop sequence appeared."""
        self._ids.append(token_id)
        piece = self._decoder.step(self._tokenizer, token_id)
        if not piece:
            return ""
        searched_from = max(0, len(self.text) - max((len(s) for s in self._stops), default=0))
        self.text += piece
        if self._stops:
            found = [i for stop in self._stops if (i := self.text.find(stop, searched_from)) >= 0]
            if found:
                self.stopped = True
                return self._release(min(found))
            return self._release(len(self.text) - _held_back(self.text, self._stops))
        return self._release(len(self.text))

    def finish(self) -> str:
        """What is still held back when generation ends for another reason than a stop."""
        if self.stopped:
            return ""
        # A character left incomplete by the last token decodes as U+FFFD, as a full decode
        # of the ids would show it.
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if full.startswith(self.text):
            self.text = full
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

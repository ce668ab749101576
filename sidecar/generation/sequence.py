"""One generation's state on the model thread: its cache, its tokens, its text so far."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from sidecar.domain import FinishReason, GenerateChunk
from sidecar.generation.formats import Constraint
from sidecar.generation.sampling import Sampler, SamplingParams
from sidecar.generation.text import TextStream
from sidecar.runtime.backend import Cache


@dataclass(frozen=True)
class Prompt:
    """The ids the model starts from, and how many were cut to fit its context."""

    ids: list[int]
    truncated_tokens: int = 0


class Sequence:
    """A generation between decode steps. Only the scheduler's job mutates it (one at a time)."""

    def __init__(
        self,
        prompt: Prompt,
        params: SamplingParams,
        tokenizer: Tokenizer,
        context_limit: int,
        decoder_start: int | None,
        constraint: Constraint | None = None,
    ) -> None:
        self.prompt = prompt
        self.constraint = constraint
        self.params = params
        self._sampler = Sampler(params)
        self._text = TextStream(tokenizer, params.stop)
        # What the decoder has seen, which repetition penalties look at: the prompt for a
        # decoder-only model, the start token and the reply for an encoder-decoder.
        self.context = [decoder_start] if decoder_start is not None else list(prompt.ids)
        self._limit = context_limit
        self.generated: list[int] = []
        self.cache: Cache | None = None
        self.finish: FinishReason | None = None
        self.inference_us = 0
        self.batch_size = 0  # most sequences that shared one of those passes
        self.started_ns = 0  # perf_counter_ns when its prefill began

    @property
    def last_token(self) -> int:
        """The token the next decode step feeds."""
        return self.generated[-1]

    def advance(self, logits: npt.NDArray[np.float32]) -> GenerateChunk:
        """Choose the next token from its logits; the chunk says what it added and if it ended."""
        constraint = self.constraint
        allowed = constraint.allowed(logits.shape[-1]) if constraint is not None else None
        # Forced tokens are not the format's: a forced BOS (a seq2seq reply's first token)
        # prints nothing, and a forced EOS at the last token cuts the reply (LENGTH below).
        forced = self._sampler.forced(self.context, len(self.generated)) is not None
        token = self._sampler.choose(logits, self.context, len(self.generated), allowed)
        self.generated.append(token)
        self.context.append(token)
        if token in self.params.eos_token_ids:
            # EOS ends a constrained reply only where the format accepts it, except a forced
            # EOS at max_new_tokens, which cuts it.
            cut = constraint is not None and not constraint.accepting
            self.finish = FinishReason.LENGTH if cut else FinishReason.EOS
            return GenerateChunk(self._text.finish(), [token], self.finish)
        if constraint is not None and not forced:
            constraint.consume(token)
        text = self._text.push(token)
        if self._text.stopped:
            self.finish = FinishReason.STOP
        elif constraint is not None and constraint.complete:
            self.finish = FinishReason.COMPLETE
            text += self._text.finish()
        elif len(self.generated) >= self.params.max_new_tokens or len(self.context) >= self._limit:
            self.finish = FinishReason.LENGTH
            text += self._text.finish()
        return GenerateChunk(text, [token], self.finish)

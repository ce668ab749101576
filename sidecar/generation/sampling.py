"""Choosing each next token: the logits processors of transformers' generate(), in numpy.

The order and semantics follow transformers (repetition penalty, no-repeat n-grams, min new
tokens, forced BOS/EOS, then temperature, top-k, top-p), so greedy decoding gives the
tokens `model.generate()` gives, and sampling the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sidecar.domain import GenerateRequest
from sidecar.errors import InvalidInputError
from sidecar.models.manifest import GenerationDefaults

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
Logits = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SamplingParams:
    """A request's generation parameters, with the model's defaults filled in."""

    max_new_tokens: int
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    stop: tuple[str, ...]
    seed: int | None
    eos_token_ids: tuple[int, ...]
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    suppressed_token_ids: tuple[int, ...] = ()


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    return value


def resolve(request: GenerateRequest, defaults: GenerationDefaults) -> SamplingParams:
    """Fill unset parameters from the model's generation config; refuse out-of-range values."""
    if request.max_new_tokens < 0:
        raise InvalidInputError(
            f"max_new_tokens must be 0 (the default) or more, got {request.max_new_tokens}"
        )
    temperature = request.temperature
    if temperature is not None and _finite("temperature", temperature) < 0:
        raise InvalidInputError(f"temperature must be 0 (greedy) or more, got {temperature}")
    if request.top_k is not None and request.top_k < 0:
        raise InvalidInputError(f"top_k must be 0 (no limit) or more, got {request.top_k}")
    top_p = request.top_p
    if top_p is not None and not 0 < _finite("top_p", top_p) <= 1:
        raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
    penalty = request.repetition_penalty
    if penalty is not None and _finite("repetition_penalty", penalty) <= 0:
        raise InvalidInputError(f"repetition_penalty must be above 0 (1 = off), got {penalty}")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidInputError(
            f"{len(request.stop)} stop sequences; at most {MAX_STOP_SEQUENCES} are allowed"
        )
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidInputError(
                f"stop[{index}] must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}"
            )
    # An explicit temperature decides; otherwise the model's do_sample does (as generate()).
    greedy = temperature == 0 if temperature is not None else not defaults.do_sample
    return SamplingParams(
        max_new_tokens=request.max_new_tokens or defaults.max_new_tokens,
        greedy=greedy,
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty,
        stop=tuple(request.stop),
        seed=request.seed,
        eos_token_ids=defaults.eos_token_ids,
        min_new_tokens=defaults.min_new_tokens,
        no_repeat_ngram_size=defaults.no_repeat_ngram_size,
        forced_bos_token_id=defaults.forced_bos_token_id,
        forced_eos_token_id=defaults.forced_eos_token_id,
        suppressed_token_ids=defaults.suppressed_token_ids,
    )


def _banned_ngram_tokens(ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ids."""
    if len(ids) + 1 < n:
        return []
    prefix = tuple(ids[len(ids) - n + 1 :])
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix]


class Sampler:
    """One sequence's token choice; owns its random generator (seeded: reproducible)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def choose(
        self,
        logits: Logits,
        context: Sequence[int],
        generated: int,
        allowed: npt.NDArray[np.bool_] | None = None,
    ) -> int:
        """The next token after `context` (the ids the decoder has seen), `generated` so far,
        among the `allowed` ones when a response format constrains it."""
        p = self.params
        forced = self.forced(context, generated)
        if forced is not None:
            return forced
        if allowed is not None:  # as a grammar's logits processor, before every other one
            logits = np.where(allowed, logits, np.float32(-np.inf))
        if np.isnan(logits).any():  # an fp16 overflow in the model: never choose it
            logits = np.where(np.isnan(logits), np.float32(-np.inf), logits)
        if allowed is not None and np.isneginf(logits).all():
            # Nothing the format allows has a usable logit: choose among the allowed alike.
            logits = np.where(allowed, np.float32(0.0), np.float32(-np.inf))
        scores = self._processed(logits, context, generated)
        if scores is None:
            return int(np.argmax(logits))  # the common case, once per token: keep it cheap
        if allowed is not None and np.isneginf(scores).all():
            # The processors ruled out every token the format allows: the format wins, so
            # the reply stays valid.
            scores = logits.astype(np.float64)
        if p.greedy:
            return int(np.argmax(scores))
        return self._sample(scores)

    def forced(self, context: Sequence[int], generated: int) -> int | None:
        """The token the model's generation config forces next, if any. As transformers: BOS
        only when the decoder has seen a single token (a seq2seq start token, or a one-token
        prompt); EOS when one token of room is left."""
        p = self.params
        if len(context) == 1 and generated == 0 and p.forced_bos_token_id is not None:
            return p.forced_bos_token_id
        if generated == p.max_new_tokens - 1 and p.forced_eos_token_id is not None:
            return p.forced_eos_token_id
        return None

    def _processed(self, logits: Logits, context: Sequence[int], generated: int) -> Scores | None:
        """The scores after the repetition penalty and the bans; None when greedy decoding
        needs none of them (the argmax of the logits is the answer)."""
        p = self.params
        penalised = p.repetition_penalty != 1.0 and len(context) > 0
        early = generated < p.min_new_tokens and bool(p.eos_token_ids)
        banned = p.no_repeat_ngram_size or early or p.suppressed_token_ids
        if p.greedy and not (penalised or banned):
            return None
        # float64, so a tiny temperature or penalty scales scores without overflowing.
        scores = logits.astype(np.float64)
        if penalised:
            seen = np.unique(np.asarray(context, dtype=np.int64))
            values = scores[seen]
            scores[seen] = np.where(
                values < 0, values * p.repetition_penalty, values / p.repetition_penalty
            )
        if p.no_repeat_ngram_size > 0:
            scores[_banned_ngram_tokens(context, p.no_repeat_ngram_size)] = -np.inf
        if early:
            scores[list(p.eos_token_ids)] = -np.inf
        if p.suppressed_token_ids:
            scores[list(p.suppressed_token_ids)] = -np.inf
        return scores

    def _sample(self, scores: Scores) -> int:
        p = self.params
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        if p.top_p < 1.0:
            # As transformers: drop the least likely tokens whose total mass is <= 1 - top_p,
            # always keeping the most likely one.
            order = np.argsort(scores, kind="stable")
            probs = _softmax(scores[order])
            drop = np.cumsum(probs) <= 1 - p.top_p
            drop[-1] = False
            scores = scores.copy()
            scores[order[drop]] = -np.inf
        probs = _softmax(scores)
        return int(self._rng.choice(len(probs), p=probs))


def _softmax(scores: Scores) -> Scores:
    top = np.max(scores)
    if np.isposinf(top):  # scaled past float64: the infinite scores share all the mass
        weights = (scores == top).astype(np.float64)
    elif np.isneginf(top):  # every token ruled out: none is preferred
        weights = np.ones_like(scores)
    else:
        weights = np.exp(scores - top)
    result: Scores = weights / weights.sum()
    return result

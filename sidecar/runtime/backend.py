"""The protocol every inference backend implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Arrays = Mapping[str, npt.NDArray[np.generic]]


class Backend(Protocol):
    """Runs a model's forward pass on named numpy inputs. Called from executor threads."""

    name: str  # "onnx" or "torch"
    device: str  # "cpu" or "cuda:<index>"
    input_names: tuple[str, ...]
    intra_op_threads: int  # CPU threads one pass uses; 0 = the runtime's default (every core)
    half_threads: int  # threads of a second lane run(inputs, threads=half_threads) uses; 0 none

    def run(self, inputs: Arrays, threads: int | None = None) -> dict[str, npt.NDArray[np.float32]]:
        """One forward pass; returns the model's outputs by name.

        `threads` asks for a pass on that many CPU threads where the backend can run one
        (see OnnxBackend's half lane); None, or a backend that cannot, uses its own.
        """
        ...


# A sequence's key/value cache, opaque to everything but the decoder that made it.
Cache = Any


class Decoder(Protocol):
    """Runs a generative model one token at a time with a KV cache. Called from executor threads.

    One instance serves many sequences at once; all per-sequence state lives in its Cache.
    """

    name: str  # "onnx" or "torch"
    device: str  # "cpu" or "cuda:<index>"

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[npt.NDArray[np.float32], Cache]:
        """Run the prompt; return the logits for the first new token ([vocab]) and the cache.

        Decoder-only models run the prompt through the decoder. Seq2seq models run it through
        the encoder, then feed the decoder its start token.
        """
        ...

    def step(
        self, caches: Sequence[Cache], tokens: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], list[Cache]]:
        """Feed each sequence its last token; return next-token logits ([n, vocab]) and caches.

        Sequences of different lengths may share one step; caches passed in are not reused.
        """
        ...

"""Generation on ONNX Runtime: optimum's with-past graphs driven one token at a time.

Decoder-only exports (model.onnx) take `past_key_values.<layer>.key/value` and return
`present.<layer>.key/value`; seq2seq exports run `encoder_model.onnx` once, then the merged
decoder, whose `use_cache_branch` input picks the first-step or the cached branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.errors import ModelLoadError
from sidecar.runtime.backend import Cache
from sidecar.runtime.onnx import OnnxBackend

Array = npt.NDArray[np.generic]
_PAST = "past_key_values."
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Prompt tokens per prefill run (see OnnxCausalDecoder.prefill).
PREFILL_CHUNK = 512


def _past_names(backend: OnnxBackend) -> list[str]:
    return [name for name in backend.input_names if name.startswith(_PAST)]


def _present(name: str) -> str:
    """The output that carries a past input forward: past_key_values.0.key -> present.0.key."""
    return "present." + name[len(_PAST) :]


def _empty_past(backend: OnnxBackend, name: str, batch: int) -> Array:
    """A zero-length past tensor: [batch, heads, 0, head_dim] as the graph declares it."""
    shape = backend.input_shapes[name]
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
        raise ModelLoadError(f"cannot read heads and head size from {name}'s shape {shape}")
    dtype = _FLOAT_TYPES.get(backend.input_types[name], np.float32)
    return np.zeros((batch, shape[1], 0, shape[3]), dtype=dtype)


def _last_logits(outputs: dict[str, npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    """Logits of each row's last position, as float32 [batch, vocab]."""
    return np.ascontiguousarray(outputs["logits"][:, -1, :], dtype=np.float32)


@dataclass
class CausalCache:
    """One sequence's past: row `row` of a step's packed past, its last `length` positions.

    The sequences that ran one step together share that step's presents as the graph
    returned them, [rows, heads, width, head_dim] per past input and left-padded to the
    longest: when the same sequences run the next step together, the presents are fed back
    whole, with no copy. Only a change of company (a sequence joins or leaves) packs anew.
    """

    batch: Mapping[str, Array]
    row: int
    length: int

    @property
    def past(self) -> dict[str, Array]:
        """This sequence's own past: [1, heads, length, head_dim] views into the batch."""
        return {
            name: value[self.row : self.row + 1, :, value.shape[2] - self.length :, :]
            for name, value in self.batch.items()
        }


def _shared_batch(caches: Sequence[CausalCache]) -> Mapping[str, Array] | None:
    """The packed past these caches are exactly the rows of (each once), else None."""
    batch = caches[0].batch
    if any(cache.batch is not batch for cache in caches):
        return None
    rows = next(iter(batch.values())).shape[0]
    if len(caches) != rows or {cache.row for cache in caches} != set(range(rows)):
        return None
    return batch


class OnnxCausalDecoder:
    """A decoder-only LM (GPT-2, Llama, ...) exported as text-generation-with-past."""

    name = "onnx"

    def __init__(self, path: Path, device: str, intra_op_threads: int = 0) -> None:
        self._model = OnnxBackend(path, device, intra_op_threads)
        self.device = self._model.device
        self._past = _past_names(self._model)
        if not self._past:
            raise ModelLoadError(
                f"{path} takes no past_key_values inputs: export it with the sidecar's "
                "exporter (task text-generation-with-past) so decoding can reuse its cache"
            )
        # A graph without position ids counts positions from the past's length, which left
        # padding would shift: such a graph only batches sequences of one length.
        self._positions = "position_ids" in self._model.input_names

    def _run(
        self, ids: Array, mask: Array, positions: Array, past: dict[str, Array]
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
        outputs = self._model.run(
            {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        )
        return _last_logits(outputs), outputs

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[npt.NDArray[np.float32], Cache]:
        """Run the prompt with an empty past, PREFILL_CHUNK tokens at a time.

        Each run returns logits for every position it is fed and attends over all of them at
        once: in chunks, a 4,000-token prompt on SmolLM2-135M took half the time (19 s
        against 38) and half the memory (1.8 GB against 3.7) for the same logits.
        """
        n = len(prompt_ids)
        past: dict[str, Array] = {name: _empty_past(self._model, name, 1) for name in self._past}
        done = 0
        while True:  # once at least: an empty prompt fails in the graph as it did unchunked
            chunk = prompt_ids[done : done + PREFILL_CHUNK]
            end = done + len(chunk)
            logits, outputs = self._run(
                np.asarray([chunk], dtype=np.int64),
                np.ones((1, end), dtype=np.int64),
                np.arange(done, end, dtype=np.int64)[None, :],
                past,
            )
            past = {name: outputs[_present(name)] for name in self._past}
            done = end
            if done >= n:
                return logits[0], CausalCache(past, 0, n)

    def step(
        self, caches: Sequence[Cache], tokens: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], list[Cache]]:
        """One token per sequence; sequences of different lengths share one run, left-padded.

        The sequences of the last step, together again, feed its presents back as they are;
        any other company is packed into a new batch first (a copy of every cache).
        """
        lengths = [cache.length for cache in caches]
        if not self._positions and len(set(lengths)) > 1:
            return self._step_by_length(caches, tokens)
        shared = _shared_batch(caches)
        if shared is None:
            past, rows = self._pack(caches), list(range(len(caches)))
        else:
            past, rows = dict(shared), [cache.row for cache in caches]
        count = len(caches)
        width = next(iter(past.values())).shape[2]
        # Inputs in the batch's row order; the mask hides each row's left padding and
        # position_ids keep each sequence's own positions.
        ids = np.empty((count, 1), dtype=np.int64)
        positions = np.empty((count, 1), dtype=np.int64)
        mask = np.zeros((count, width + 1), dtype=np.int64)
        for row, token, length in zip(rows, tokens, lengths, strict=True):
            ids[row, 0], positions[row, 0] = token, length
            mask[row, width - length :] = 1
        logits, outputs = self._run(ids, mask, positions, past)
        present = {name: outputs[_present(name)] for name in self._past}
        new: list[Cache] = [
            CausalCache(present, row, length + 1) for row, length in zip(rows, lengths, strict=True)
        ]
        return logits[rows] if rows != sorted(rows) else logits, new

    def _pack(self, caches: Sequence[CausalCache]) -> dict[str, Array]:
        """The caches' pasts as one batch, left-padded to the longest, rows in their order."""
        width = max(cache.length for cache in caches)
        past: dict[str, Array] = {}
        for name in self._past:
            first = caches[0].batch[name]
            shape = (len(caches), first.shape[1], width, first.shape[3])
            packed = np.zeros(shape, dtype=first.dtype)
            for row, cache in enumerate(caches):
                own = cache.batch[name]
                packed[row, :, width - cache.length :, :] = own[
                    cache.row, :, own.shape[2] - cache.length :, :
                ]
            past[name] = packed
        return past

    def _step_by_length(
        self, caches: Sequence[Cache], tokens: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], list[Cache]]:
        """One run per cache length, the rows put back in order."""
        groups: dict[int, list[int]] = {}
        for row, cache in enumerate(caches):
            groups.setdefault(cache.length, []).append(row)
        rows: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(caches)
        new: list[Cache] = [None] * len(caches)
        for members in groups.values():
            logits, stepped = self.step([caches[r] for r in members], [tokens[r] for r in members])
            for index, row in enumerate(members):
                rows[row], new[row] = logits[index], stepped[index]
        return np.stack(rows), new


@dataclass
class Seq2SeqCache:
    """One sequence's encoder output and decoder past."""

    encoder_hidden: Array
    encoder_mask: Array
    past: dict[str, Array]


class OnnxSeq2SeqDecoder:
    """An encoder-decoder (BART, T5, ...) exported as text2text-generation-with-past."""

    name = "onnx"

    def __init__(
        self,
        encoder_path: Path,
        decoder_path: Path,
        device: str,
        decoder_start_token_id: int,
        intra_op_threads: int = 0,
    ) -> None:
        self._encoder = OnnxBackend(encoder_path, device, intra_op_threads)
        self._decoder = OnnxBackend(decoder_path, device, intra_op_threads)
        self.device = self._decoder.device
        self._start = decoder_start_token_id
        self._past = _past_names(self._decoder)
        if "use_cache_branch" not in self._decoder.input_names or not self._past:
            raise ModelLoadError(
                f"{decoder_path} is not a merged with-past decoder: export the model with the "
                "sidecar's exporter (task text2text-generation-with-past)"
            )

    def _decode(
        self, token: int, hidden: Array, mask: Array, past: dict[str, Array], *, cached: bool
    ) -> tuple[npt.NDArray[np.float32], dict[str, Array]]:
        outputs = self._decoder.run(
            {
                "input_ids": np.asarray([[token]], dtype=np.int64),
                "encoder_hidden_states": hidden,
                "encoder_attention_mask": mask,
                "use_cache_branch": np.asarray([cached]),
                **past,
            }
        )
        # The cached branch returns placeholders for the encoder's keys and values: those
        # never change after the first step, so they are carried over from the past.
        present: dict[str, Array] = {
            name: past[name] if cached and ".encoder." in name else outputs[_present(name)]
            for name in self._past
        }
        return _last_logits(outputs), present

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[npt.NDArray[np.float32], Cache]:
        """Encode the prompt, then run the decoder on its start token."""
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = self._encoder.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        empty = {name: _empty_past(self._decoder, name, 1) for name in self._past}
        logits, present = self._decode(self._start, hidden, mask, empty, cached=False)
        return logits[0], Seq2SeqCache(hidden, mask, present)

    def step(
        self, caches: Sequence[Cache], tokens: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], list[Cache]]:
        """One token per sequence, each run alone.

        The merged decoder takes no decoder attention mask, so sequences of different
        lengths cannot share a run.
        """
        rows, new = [], []
        for cache, token in zip(caches, tokens, strict=True):
            logits, present = self._decode(
                token, cache.encoder_hidden, cache.encoder_mask, cache.past, cached=True
            )
            rows.append(logits[0])
            new.append(Seq2SeqCache(cache.encoder_hidden, cache.encoder_mask, present))
        return np.stack(rows), new

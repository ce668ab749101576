"""Validation of generative exports: the ONNX graphs, fed their KV cache the way a decoding
loop feeds it, against the PyTorch model on the same prompts.

Each prompt is checked at prefill (whole prompt, empty past) and at one cached step (the
next token with the prefill's presents as past); then all prompts take one cached step
together, their caches left-padded to the longest and masked, as batched decoding does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.checkpoint import CheckpointInfo
from export.convert import SERVED
from sidecar.errors import ValidationError
from sidecar.models.manifest import Task
from sidecar.tasks.tokenization import TextEncoder

FloatArray = npt.NDArray[np.float32]
Cache = dict[str, FloatArray]

SHORT = "Refund not received after 14 days."
UNICODE = "Café déjà vu — naïve façade, 東京 and emoji 🚀 all in one ticket."
_PAST = "past_key_values."
_PRESENT = "present."


def prompts(max_length: int) -> list[str]:
    """A short prompt, one with several scripts, and one cut to the longest allowed."""
    long_text = " ".join(["The customer reports the export fails on large reports."] * max_length)
    return [SHORT, UNICODE, long_text]


def prompt_limit(info: CheckpointInfo) -> int:
    """Longest prompt validated: a decoder-only model keeps one position for the next token."""
    return info.max_length - 1 if info.task is Task.GENERATE else info.max_length


def checked_ids(encoder: TextEncoder, tokenizer: Any, text: str, limit: int) -> list[int]:
    """The sidecar tokenizer's ids for text; ValidationError if the checkpoint's differ."""
    ids = [int(i) for i in encoder.encode_each([text], truncate=True)[0].ids]
    expected = list(tokenizer(text, truncation=True, max_length=limit)["input_ids"])
    if ids != expected:
        raise ValidationError(
            f"the exported tokenizer gives other ids than the checkpoint's tokenizer for "
            f"{text[:40]!r}...: the model would see different text than it was trained on"
        )
    return ids


class _Graph:
    """An ONNX graph in an ORT session, fed by name, with its past inputs described."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only, as the sidecar's own sessions
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = path.name
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> Cache:
        """Zero-length past tensors [batch, heads, 0, head_dim]: a first pass has no cache."""
        past = {}
        for name, shape in self.inputs.items():
            if not name.startswith(_PAST):
                continue
            heads, head_dim = shape[1], shape[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ValidationError(f"{name} has no fixed heads / head size: {shape}")
            past[name] = np.zeros((batch, heads, 0, head_dim), np.float32)
        return past

    def run(self, feed: dict[str, npt.NDArray[Any]]) -> dict[str, FloatArray]:
        """Feed the inputs the graph declares; return every output by name."""
        unknown = sorted(set(self.inputs) - set(feed))
        if unknown:
            raise ValidationError(
                f"{self.name} needs inputs {unknown} that a decoding loop here does not feed"
            )
        outputs = self.session.run(None, {name: feed[name] for name in self.inputs})
        return dict(zip(self.outputs, outputs, strict=True))


def _as_past(outputs: dict[str, FloatArray]) -> Cache:
    """present.* outputs renamed as the past_key_values.* inputs of the next pass."""
    return {
        _PAST + name.removeprefix(_PRESENT): value
        for name, value in outputs.items()
        if name.startswith(_PRESENT)
    }


def _left_pad(values: list[FloatArray], length: int, axis: int) -> FloatArray:
    """Batch per-sequence arrays, zero-padded on the left of `axis` to `length`."""
    padded = []
    for value in values:
        widths = [(0, 0)] * value.ndim
        widths[axis] = (length - value.shape[axis], 0)
        padded.append(np.pad(value, widths))
    return np.concatenate(padded)


def _batch_caches(caches: list[Cache], length: int, part: str = "") -> Cache:
    """One batched cache from per-sequence ones (the `part` entries only), sequence axis 2."""
    names = [name for name in caches[0] if part in name]
    return {name: _left_pad([c[name] for c in caches], length, 2) for name in names}


def _mask(lengths: list[int], width: int) -> npt.NDArray[np.int64]:
    """Attention mask of left-padded rows: ones over each row's last `length` positions."""
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return mask


def _diff(actual: FloatArray, expected: Any) -> float:
    return float(np.max(np.abs(actual - np.asarray(expected))))


@dataclass
class _Report:
    atol: float
    cases: list[dict[str, Any]]

    def add(self, stage: str, batch: int, seq_len: int, diff: float) -> None:
        # `not diff <= atol` is true for NaN: a NaN always fails.
        if not diff <= self.atol:
            raise ValidationError(
                f"ONNX {stage} outputs differ from PyTorch by {diff:.2e} (atol {self.atol:.0e}) "
                f"on a batch of {batch} x {seq_len} tokens: the export is not faithful"
            )
        self.cases.append(
            {"stage": stage, "batch": batch, "seq_len": seq_len, "max_abs_diff": diff}
        )


def _decoder_only(graph: _Graph, model: Any, prompts: list[list[int]], report: _Report) -> None:
    import torch

    caches, tokens, expected_steps = [], [], []
    for ids in prompts:
        n = len(ids)
        with torch.inference_mode():
            reference = model(input_ids=torch.tensor([ids]), use_cache=True)
            token = int(reference.logits[0, -1].argmax())
            step = model(
                input_ids=torch.tensor([[token]]),
                attention_mask=torch.ones((1, n + 1), dtype=torch.long),
                past_key_values=reference.past_key_values,
                use_cache=True,
            )
        feed: dict[str, npt.NDArray[Any]] = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            **graph.empty_past(1),
        }
        prefill = graph.run(feed)
        report.add("prefill", 1, n, _diff(prefill["logits"], reference.logits))
        cache = _as_past(prefill)
        stepped = graph.run(
            {
                "input_ids": np.asarray([[token]], np.int64),
                "attention_mask": np.ones((1, n + 1), np.int64),
                "position_ids": np.asarray([[n]], np.int64),
                **cache,
            }
        )
        report.add("cached step", 1, n + 1, _diff(stepped["logits"], step.logits))
        caches.append(cache)
        tokens.append(token)
        expected_steps.append(step.logits[0].numpy())

    lengths = [len(ids) for ids in prompts]
    longest = max(lengths)
    batched = graph.run(
        {
            "input_ids": np.asarray([[t] for t in tokens], np.int64),
            "attention_mask": _mask([n + 1 for n in lengths], longest + 1),
            "position_ids": np.asarray([[n] for n in lengths], np.int64),
            **_batch_caches(caches, longest),
        }
    )
    report.add(
        "batched cached step", len(prompts), longest + 1, _diff(batched["logits"], expected_steps)
    )


def _seq2seq(
    encoder: _Graph,
    decoder: _Graph,
    model: Any,
    start: int,
    prompts: list[list[int]],
    report: _Report,
) -> None:
    import torch

    caches, hidden_states, tokens, expected_steps = [], [], [], []
    for ids in prompts:
        n = len(ids)
        input_ids = torch.tensor([ids])
        mask = torch.ones((1, n), dtype=torch.long)
        with torch.inference_mode():
            encoded = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
            first = model(
                encoder_outputs=encoded,
                attention_mask=mask,
                decoder_input_ids=torch.tensor([[start]]),
                use_cache=True,
            )
            token = int(first.logits[0, -1].argmax())
            step = model(
                encoder_outputs=encoded,
                attention_mask=mask,
                decoder_input_ids=torch.tensor([[token]]),
                past_key_values=first.past_key_values,
                use_cache=True,
            )
        hidden = encoder.run({"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[
            "last_hidden_state"
        ]
        report.add("encoder", 1, n, _diff(hidden, encoded.last_hidden_state))
        common = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.numpy()}
        started = decoder.run(
            {
                **common,
                "input_ids": np.asarray([[start]], np.int64),
                "use_cache_branch": np.asarray([False]),
                **decoder.empty_past(1),
            }
        )
        report.add("decoder start", 1, 1, _diff(started["logits"], first.logits))
        # The cached branch returns placeholders for the cross-attention presents: the
        # encoder's keys and values from the first pass are reused for the whole sequence.
        cache = _as_past(started)
        stepped = decoder.run(
            {
                **common,
                "input_ids": np.asarray([[token]], np.int64),
                "use_cache_branch": np.asarray([True]),
                **cache,
            }
        )
        report.add("cached step", 1, 2, _diff(stepped["logits"], step.logits))
        caches.append(cache)
        hidden_states.append(hidden)
        tokens.append(token)
        expected_steps.append(step.logits[0].numpy())

    # Every decoder is one token in, so only the encoder side needs padding and a mask.
    lengths = [len(ids) for ids in prompts]
    longest = max(lengths)
    batched = decoder.run(
        {
            "encoder_hidden_states": _left_pad(hidden_states, longest, 1),
            "encoder_attention_mask": _mask(lengths, longest),
            "input_ids": np.asarray([[t] for t in tokens], np.int64),
            "use_cache_branch": np.asarray([True]),
            **_batch_caches(caches, 1, ".decoder."),
            **_batch_caches(caches, longest, ".encoder."),
        }
    )
    report.add("batched cached step", len(prompts), 2, _diff(batched["logits"], expected_steps))


def validate(
    source: Path, exported: Path, info: CheckpointInfo, atol: float, trust_remote_code: bool
) -> dict[str, Any]:
    """Compare ONNX logits with PyTorch's at prefill and cached steps; raise above atol."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    seq2seq = info.task is Task.SEQ2SEQ
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = model_class.from_pretrained(source, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    limit = prompt_limit(info)
    encoder = TextEncoder(exported, limit)
    ids = [checked_ids(encoder, tokenizer, text, limit) for text in prompts(info.max_length)]
    report = _Report(atol, [])
    graph, encoder_graph = SERVED[info.task]
    if seq2seq:
        assert info.generation is not None  # checkpoint.inspect fills it for generative tasks
        start = int(info.generation["decoder_start_token_id"])
        decoder = _Graph(exported / graph)
        _seq2seq(_Graph(exported / encoder_graph), decoder, model, start, ids, report)
    else:
        _decoder_only(_Graph(exported / graph), model, ids, report)
    worst = max(case["max_abs_diff"] for case in report.cases)
    return {"atol": atol, "max_abs_diff": worst, "cases": report.cases}

"""Validation of generative exports: the ONNX graphs, fed their KV cache the way a decoding
loop feeds it, against the PyTorch model on the same prompts.

Each prompt is checked at prefill (whole prompt, empty past) and at one cached step (the
next token with the prefill's presents as past); then all prompts take one cached step
together, their caches left-padded to the longest and masked, as batched decoding does.
Prompts are cut to a bounded length (eager PyTorch over a full 8k context takes minutes and
gigabytes); a decoder-only graph that takes position ids also runs a short prompt placed at
the end of its context, so the last positions are checked without a long prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.checkpoint import CheckpointInfo
from export.compare import NextTokens, Tolerance, closeness, refusal
from export.convert import SERVED
from export.errors import ValidationError
from sidecar.models.manifest import Task
from sidecar.tasks.tokenization import TextEncoder

FloatArray = npt.NDArray[np.float32]
Cache = dict[str, FloatArray]

SHORT = "Refund not received after 14 days."
UNICODE = "Café déjà vu — naïve façade, 東京 and emoji 🚀 all in one ticket."
PAST = "past_key_values."
_PRESENT = "present."


def long_text(max_length: int) -> str:
    """Text longer than max_length tokens in any tokenizer."""
    return " ".join(["The customer reports the export fails on large reports."] * max_length)


def prompts(max_length: int) -> list[str]:
    """A short prompt, one with several scripts, and one cut to the longest allowed."""
    return [SHORT, UNICODE, long_text(max_length)]


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


class Graph:
    """An ONNX graph in an ORT session, fed by name, with its past inputs described."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only, as the sidecar's own sessions
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = path.name
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self._types = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def check_presents(self) -> None:
        """Every past input needs the output that carries it to the next step."""
        missing = [
            _PRESENT + name.removeprefix(PAST)
            for name in self.inputs
            if name.startswith(PAST) and _PRESENT + name.removeprefix(PAST) not in self.outputs
        ]
        if missing:
            raise ValidationError(
                f"{self.name} returns no {', '.join(missing)}: a decoding step could not pass "
                "its cache on, so the export is not faithful"
            )

    @property
    def takes_positions(self) -> bool:
        """Whether the graph takes position ids (else it counts positions from the past)."""
        return "position_ids" in self.inputs

    def empty_past(self, batch: int) -> Cache:
        """Zero-length past tensors [batch, heads, 0, head_dim]: a first pass has no cache."""
        past = {}
        for name, shape in self.inputs.items():
            if not name.startswith(PAST):
                continue
            heads, head_dim = shape[1], shape[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ValidationError(f"{name} has no fixed heads / head size: {shape}")
            # float16 graphs (model_fp16.onnx) take a float16 past.
            dtype = np.float16 if self._types[name] == "tensor(float16)" else np.float32
            past[name] = np.zeros((batch, heads, 0, head_dim), dtype)
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


def as_past(outputs: dict[str, FloatArray]) -> Cache:
    """present.* outputs renamed as the past_key_values.* inputs of the next pass."""
    return {
        PAST + name.removeprefix(_PRESENT): value
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


def batch_caches(caches: list[Cache], length: int, part: str = "") -> Cache:
    """One batched cache from per-sequence ones (the `part` entries only), sequence axis 2."""
    names = [name for name in caches[0] if part in name]
    return {name: _left_pad([c[name] for c in caches], length, 2) for name in names}


def left_padded_mask(lengths: list[int], width: int) -> npt.NDArray[np.int64]:
    """Attention mask of left-padded rows: ones over each row's last `length` positions."""
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return mask


@dataclass
class Report:
    """The cases compared so far; raises on the first one out of tolerance."""

    tol: Tolerance
    reference: str = "PyTorch"
    cases: list[dict[str, Any]] = field(default_factory=list)
    tokens: NextTokens = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = NextTokens()

    def add(
        self,
        stage: str,
        actual: npt.NDArray[Any],
        expected: Any,
        batch: int,
        seq_len: int,
        first_position: int = 0,
        *,
        logits: bool = True,
        reference: str | None = None,
    ) -> None:
        """Compare one stage's outputs; logits are also compared by next-token choice."""
        expected = np.asarray(expected)
        reference = reference or self.reference
        found = closeness(actual, expected, self.tol)
        if not found.passed:
            raise refusal(f"ONNX {stage} outputs", found, self.tol, (batch, seq_len), reference)
        if logits:
            self.tokens.add(actual, expected, stage, reference)
        self.cases.append(
            {
                "stage": stage,
                "batch": batch,
                "seq_len": seq_len,
                **({"first_position": first_position} if first_position else {}),
                "max_abs_diff": found.max_abs_diff,
                "tolerance_used": found.tolerance_used,
            }
        )

    def record(self) -> dict[str, Any]:
        """The manifest's validation figures."""
        return {
            "atol": self.tol.atol,
            "rtol": self.tol.rtol,
            "max_abs_diff": max(case["max_abs_diff"] for case in self.cases),
            "tolerance_used": max(case["tolerance_used"] for case in self.cases),
            "next_token": self.tokens.record(),
            "cases": self.cases,
        }


def _torch_prefill_and_step(
    model: Any, ids: list[int], start: int
) -> tuple[int, FloatArray, FloatArray]:
    """PyTorch's prefill logits, the greedy next token, and the cached step's logits, with
    the prompt placed at positions start, start + 1, ..."""
    import torch

    n = len(ids)
    # Positions only when they do not start at 0: some models (Bloom) take none.
    first = {"position_ids": torch.arange(start, start + n)[None]} if start else {}
    then = {"position_ids": torch.tensor([[start + n]])} if start else {}
    with torch.inference_mode():
        prefill = model(input_ids=torch.tensor([ids]), use_cache=True, **first)
        token = int(prefill.logits[0, -1].argmax())
        step = model(
            input_ids=torch.tensor([[token]]),
            attention_mask=torch.ones((1, n + 1), dtype=torch.long),
            past_key_values=prefill.past_key_values,
            use_cache=True,
            **then,
        )
    return token, prefill.logits.numpy(), step.logits.numpy()


def feed(
    ids: list[int], past: Cache, past_length: int = 0, start: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    """A decoder graph's inputs for one sequence: `ids` on top of a past of past_length
    tokens, at positions from `start` (by default right after the past)."""
    first = past_length if start is None else start
    return {
        "input_ids": np.asarray([ids], np.int64),
        "attention_mask": np.ones((1, past_length + len(ids)), np.int64),
        "position_ids": np.arange(first, first + len(ids), dtype=np.int64)[None],
        **past,
    }


def _onnx_prefill_and_step(
    graph: Graph, ids: list[int], token: int, start: int
) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
    """The graph's prefill and cached step outputs, as _torch_prefill_and_step runs them."""
    n = len(ids)
    prefill = graph.run(feed(ids, graph.empty_past(1), 0, start))
    step = graph.run(feed([token], as_past(prefill), n, start + n))
    return prefill, step


def chunked_prefill(graph: Graph, ids: list[int], split: int) -> FloatArray:
    """The logits of ids[split:], prefilled on top of the cache of ids[:split], as the sidecar
    prefills a long prompt in chunks."""
    head = graph.run(feed(ids[:split], graph.empty_past(1)))
    return graph.run(feed(ids[split:], as_past(head), split))["logits"]


def batched_step(
    graph: Graph, caches: list[Cache], tokens: list[int], lengths: list[int]
) -> FloatArray:
    """One decoding step of several sequences together, their caches left-padded to the
    longest and masked, as the sidecar batches them."""
    longest = max(lengths)
    return graph.run(
        {
            "input_ids": np.asarray([[t] for t in tokens], np.int64),
            "attention_mask": left_padded_mask([n + 1 for n in lengths], longest + 1),
            "position_ids": np.asarray([[n] for n in lengths], np.int64),
            **batch_caches(caches, longest),
        }
    )["logits"]


def _decoder_only(
    graph: Graph, model: Any, prompts: list[list[int]], context: int, report: Report
) -> None:
    caches, tokens, expected_steps = [], [], []
    expected_prefill: FloatArray = np.empty(0, np.float32)
    for ids in prompts:
        n = len(ids)
        token, expected_prefill, expected_step = _torch_prefill_and_step(model, ids, 0)
        prefill, step = _onnx_prefill_and_step(graph, ids, token, 0)
        report.add("prefill", prefill["logits"], expected_prefill, 1, n)
        report.add("cached step", step["logits"], expected_step, 1, n + 1)
        caches.append(as_past(prefill))
        tokens.append(token)
        expected_steps.append(expected_step[0])

    lengths = [len(ids) for ids in prompts]
    longest = max(lengths)
    batched = batched_step(graph, caches, tokens, lengths)
    report.add("batched cached step", batched, expected_steps, len(prompts), longest + 1)

    # Several tokens fed on top of a past: the second half of the long prompt.
    ids = prompts[-1]
    split = len(ids) // 2
    if split:
        rest = chunked_prefill(graph, ids, split)
        report.add("chunked prefill", rest, expected_prefill[:, split:], 1, len(ids), split)

    # The last positions of the context, which the bounded prompts do not reach: the unicode
    # prompt placed so that its cached step takes the very last position.
    far = prompts[1]
    start = context - 1 - len(far)
    if graph.takes_positions and start > longest:
        token, expected_prefill, expected_step = _torch_prefill_and_step(model, far, start)
        prefill, step = _onnx_prefill_and_step(graph, far, token, start)
        n = len(far)
        try:
            report.add("end-of-context prefill", prefill["logits"], expected_prefill, 1, n, start)
            report.add("end-of-context cached step", step["logits"], expected_step, 1, n + 1, start)
        except ValidationError as exc:
            # Position-dependent scaling (long-context RoPE variants) can be traced for the
            # short inputs of the export only.
            raise ValidationError(
                f"{exc}. The first {longest + 1} positions passed: with --max-length "
                f"{longest + 1} the graph would be served only where it is faithful"
            ) from None


def _seq2seq(
    encoder: Graph,
    decoder: Graph,
    model: Any,
    start: int,
    prompts: list[list[int]],
    report: Report,
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
        report.add("encoder", hidden, encoded.last_hidden_state, 1, n, logits=False)
        common = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.numpy()}
        started = decoder.run(
            {
                **common,
                "input_ids": np.asarray([[start]], np.int64),
                "use_cache_branch": np.asarray([False]),
                **decoder.empty_past(1),
            }
        )
        report.add("decoder start", started["logits"], first.logits, 1, 1)
        # The cached branch returns placeholders for the cross-attention presents: the
        # encoder's keys and values from the first pass are reused for the whole sequence.
        cache = as_past(started)
        stepped = decoder.run(
            {
                **common,
                "input_ids": np.asarray([[token]], np.int64),
                "use_cache_branch": np.asarray([True]),
                **cache,
            }
        )
        report.add("cached step", stepped["logits"], step.logits, 1, 2)
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
            "encoder_attention_mask": left_padded_mask(lengths, longest),
            "input_ids": np.asarray([[t] for t in tokens], np.int64),
            "use_cache_branch": np.asarray([True]),
            **batch_caches(caches, 1, ".decoder."),
            **batch_caches(caches, longest, ".encoder."),
        }
    )
    report.add("batched cached step", batched["logits"], expected_steps, len(prompts), 2)


def validated_prompts(
    exported: Path, tokenizer: Any, info: CheckpointInfo, max_tokens: int
) -> list[list[int]]:
    """prompts() as ids, each checked against the checkpoint's tokenizer; the long one is
    checked cut at the full context, then cut at max_tokens for the model runs."""
    limit = prompt_limit(info)
    texts = prompts(info.max_length)
    full = TextEncoder(exported, limit)
    checked = [checked_ids(full, tokenizer, text, limit) for text in texts]
    if limit <= max_tokens:
        return checked
    bounded = TextEncoder(exported, max_tokens)
    return [*checked[:-1], checked_ids(bounded, tokenizer, texts[-1], max_tokens)]


def validate(
    source: Path,
    exported: Path,
    info: CheckpointInfo,
    tol: Tolerance,
    max_tokens: int,
    *,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Compare ONNX logits with PyTorch's at prefill and cached steps; raise out of tolerance."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    seq2seq = info.task is Task.SEQ2SEQ
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = model_class.from_pretrained(source, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    ids = validated_prompts(exported, tokenizer, info, max_tokens)
    report = Report(tol)
    graph, encoder_graph = SERVED[info.task]
    decoder = Graph(exported / graph)
    decoder.check_presents()
    if seq2seq:
        assert info.generation is not None  # checkpoint.inspect fills it for generative tasks
        start = int(info.generation["decoder_start_token_id"])
        _seq2seq(Graph(exported / encoder_graph), decoder, model, start, ids, report)
    else:
        _decoder_only(decoder, model, ids, info.max_length, report)
    return report.record()

"""Validation of an imported graph, which has no PyTorch model to be compared with: its
inputs and outputs against the task, the tokenizer against its embedding table and config,
and the graph against itself.

Self-consistency catches what a broken graph gets wrong even without a reference: an input
alone must give what it gives inside a padded batch (padding and masks wired right), and a
language model's cached step must give what the whole prompt gives (the cache wired right).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export import validate, validate_generation
from export.checkpoint import CheckpointInfo
from export.compare import Tolerance
from export.errors import ValidationError
from export.imported import GraphFacts
from export.validate_generation import Graph, Report
from sidecar.models.manifest import ONNX_SELF_CONSISTENCY, Task
from sidecar.models.preflight import FEEDABLE_INPUTS, read_config
from sidecar.runtime.onnx import OnnxBackend
from sidecar.tasks.tokenization import EncodedBatch, TextEncoder

_DECODER_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})
_PER_INPUT = (Task.CLASSIFY, Task.RERANK, Task.ZERO_SHOT)
# Operators that quantize activations with a range taken from the whole batch.
_PER_BATCH_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention"})


def _refused(problem: str) -> ValidationError:
    """An error naming the imported graph (copied into the model dir as model.onnx)."""
    return ValidationError(f"the imported graph model.onnx {problem}")


def _check_inputs(info: CheckpointInfo, facts: GraphFacts) -> None:
    inputs = facts.inputs
    if "input_ids" not in inputs:
        raise _refused(f"takes no input_ids (its inputs: {sorted(inputs)})")
    if info.task is Task.SEQ2SEQ:
        raise _refused(
            "is a single graph, but an encoder-decoder is served from two: export the model "
            "from its PyTorch checkpoint instead"
        )
    feedable = FEEDABLE_INPUTS
    if info.task is Task.GENERATE:
        past = [name for name in inputs if name.startswith(validate_generation.PAST)]
        if not past:
            raise _refused(
                "takes no past_key_values inputs, so decoding could not reuse its cache: "
                "import a graph exported with its past (text-generation-with-past)"
            )
        feedable = _DECODER_INPUTS | set(past)
    unknown = set(inputs) - feedable
    if unknown:
        raise _refused(f"needs inputs {sorted(unknown)} that the sidecar cannot feed")


def check_structure(
    info: CheckpointInfo, facts: GraphFacts, config: dict[str, Any], vocab: int
) -> dict[str, Any]:
    """Inputs, outputs and embedding table against the task, config and tokenizer."""
    _check_inputs(info, facts)
    outputs = facts.outputs
    if not outputs:
        raise _refused("returns no outputs")
    wanted = "last_hidden_state" if info.task is Task.EMBED else "logits"
    # The sidecar reads the output by this name, or else the graph's first.
    name = wanted if wanted in outputs else next(iter(outputs))
    shape = outputs[name]
    rank = 2 if info.task in _PER_INPUT else 3
    # A graph may leave shapes undeclared: its self-consistency runs check them then.
    if shape is not None and len(shape) != rank:
        raise _refused(
            f"returns {name} of shape {shape}, where a {info.task.value} model returns "
            f"{wanted} of rank {rank}"
        )
    rows = facts.embedding_rows
    config_vocab = config.get("vocab_size")
    if rows is not None and isinstance(config_vocab, int) and config_vocab != rows:
        raise _refused(
            f"has an embedding table of {rows} tokens but config.json says vocab_size "
            f"{config_vocab}: the config does not belong to this graph"
        )
    table = rows if rows is not None else config_vocab
    if isinstance(table, int) and vocab > table:
        raise _refused(
            f"has an embedding table of {table} tokens but the tokenizer has {vocab}: the "
            "tokenizer does not belong to this graph"
        )
    # Classifiers and taggers give one value per label; a language model one per token.
    width = len(info.labels) if info.labels else (table if info.task.generative else None)
    if shape and isinstance(shape[-1], int) and width is not None and shape[-1] != width:
        per = "input" if rank == 2 else "token"
        of = "labels in config.json" if info.labels else "tokens in its vocabulary"
        raise _refused(
            f"returns {shape[-1]} values per {per} but there are {width} {of}: the config "
            "does not belong to this graph"
        )
    return {
        "inputs": sorted(facts.inputs),
        "output": name,
        "embedding_rows": rows,
        "tokenizer_vocab": vocab,
        "config_vocab_size": config_vocab,
    }


def _encoder_items(
    encoder: TextEncoder, info: CheckpointInfo
) -> tuple[list[EncodedBatch], EncodedBatch]:
    """Each validation input encoded alone, and all of them in one padded batch."""
    if info.task in validate.PAIR_TRUNCATION:
        pairs = validate.pair_case(info.task, info.max_length)
        alone = [validate.encode_pairs(encoder, [pair], info.task) for pair in pairs]
        return alone, validate.encode_pairs(encoder, pairs, info.task)
    texts = [text for batch in validate.cases(info.max_length) for text in batch]
    return [encoder.encode([t], truncate=True) for t in texts], encoder.encode(texts, truncate=True)


def _encoder(exported: Path, info: CheckpointInfo, report: Report, max_tokens: int) -> Report:
    """Each input alone against the same input in one padded batch."""
    backend = OnnxBackend(exported / "model.onnx", "cpu")
    report.reference = "the same input alone"
    items, together = _encoder_items(TextEncoder(exported, min(info.max_length, max_tokens)), info)
    batched = validate.served_outputs(backend.run(together.feed()), together.attention_mask, info)
    width = int(together.input_ids.shape[1])
    for row, item in enumerate(items):
        n = int(item.input_ids.shape[1])
        alone = validate.served_outputs(backend.run(item.feed()), item.attention_mask, info)
        for index, (expected, actual) in enumerate(zip(alone, batched, strict=True)):
            # Per-token outputs: the row's own tokens; pooled and per-input ones: the row.
            mine = actual[row : row + 1, :n] if expected.ndim == 3 else actual[row : row + 1]
            # The label each token (or input) gets must not change with the batch either.
            labels = index == 0 and info.task in (Task.CLASSIFY, Task.EXTRACT_ENTITIES)
            stage = "padded batch token" if expected.ndim == 3 else "padded batch"
            before = len(report.cases)
            report.add(stage, mine, expected, len(items), width, logits=labels)
            for case in report.cases[before:]:  # none where a report leaves the output out
                case.update(row=row, row_tokens=n)
    return report


@dataclass(frozen=True)
class Bars:
    """What a graph whose outputs depend on its batch must keep of its outputs alone."""

    # Cosine of each pooled embedding to the same input's alone. MiniLM quantized dynamically
    # to int8 (feed-forward layers included) kept 0.969 here; with its mask ignored, 0.26.
    min_cosine: float = 0.95
    # Share of labels, next tokens or relevance calls that stay the same.
    min_agreement: float = 0.9


def batch_dependent(facts: GraphFacts) -> bool:
    """Whether a graph's outputs for one input depend on the rest of its batch, beyond float
    rounding: dynamic activation quantization scales each batch by its own range, and float16
    rounds differently as shapes change."""
    return bool(set(facts.quantized_ops) & _PER_BATCH_OPS) or "fp16" in facts.quantization


@dataclass
class ByServedOutputs(Report):
    """A Report for batch-dependent graphs: outputs compared as callers see them (embeddings
    by cosine; labels, relevance and next tokens by agreement) against Bars, not value by
    value; token vectors, which callers never see, are left out."""

    embeddings: bool = False
    bars: Bars = field(default_factory=Bars)
    _cosines: list[float] = field(default_factory=list)
    _agree: int = 0
    _compared: int = 0
    _largest: float = 0.0

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
        """Measure one stage's outputs; the bars are applied once all stages are in."""
        ours = np.asarray(actual, np.float64)
        theirs = np.asarray(expected, np.float64)
        if not (np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs))):
            raise ValidationError(f"the imported graph gives NaN or infinite {stage} outputs")
        self._largest = max(self._largest, float(np.max(np.abs(ours - theirs), initial=0.0)))
        if ours.ndim == 3 and not logits:
            return  # token vectors of an embedder: callers get the pooled vector only
        case: dict[str, Any] = {"stage": stage, "batch": batch, "seq_len": seq_len}
        if self.embeddings:
            cosine = np.sum(ours * theirs, -1) / (
                np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1)
            )
            self._cosines += [float(c) for c in cosine.ravel()]
            case["cosine_min"] = float(np.min(cosine))
        else:
            rows, want = ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])
            # One logit (a reranker's relevance): relevant or not; else the top label / token.
            same = (
                (rows[:, 0] > 0) == (want[:, 0] > 0)
                if rows.shape[-1] == 1
                else rows.argmax(-1) == want.argmax(-1)
            )
            self._agree += int(np.sum(same))
            self._compared += len(same)
            case["top1_agreement"] = float(np.mean(same))
        self.cases.append(case)

    def record(self) -> dict[str, Any]:
        """The measures, once they clear the bars; ValidationError when one does not."""
        bars = self.bars
        # max_abs_diff for the record; the bars, not atol and rtol, decided.
        found: dict[str, Any] = {
            "atol": self.tol.atol,
            "rtol": self.tol.rtol,
            "max_abs_diff": self._largest,
        }
        if self._cosines:
            found["cosine_min"] = worst = min(self._cosines)
            if not worst >= bars.min_cosine:
                raise ValidationError(
                    f"the imported graph's embeddings in a padded batch are at cosine "
                    f"{worst:.4f} from the same input alone, below {bars.min_cosine}: its "
                    "padding or mask is wired wrongly, or its quantization loses that much "
                    "(lower --int8-min-cosine if that is acceptable)"
                )
        if self._compared:
            found["top1_agreement"] = share = self._agree / self._compared
            if not share >= bars.min_agreement:
                raise ValidationError(
                    f"the imported graph keeps {share:.0%} of its choices (labels or next "
                    f"tokens) between {self.reference} and batched or cached runs, below "
                    f"{bars.min_agreement:.0%} (lower --int8-min-agreement if that is "
                    "acceptable)"
                )
        gate = {
            name: bar
            for name, bar in (
                ("cosine_min", bars.min_cosine),
                ("top1_agreement", bars.min_agreement),
            )
            if name in found
        }
        return {
            **found,
            "compared_by": "outputs as served: the graph's results depend on its batch",
            "gate": gate,
            "cases": self.cases,
        }


def _decoder(
    exported: Path, tokenizer: Any, info: CheckpointInfo, report: Report, max_tokens: int
) -> tuple[Report, list[str]]:
    """The cached step against the whole prompt, and one batched step against single ones."""
    graph = Graph(exported / "model.onnx")
    graph.check_presents()
    report.reference = "the whole prompt without a cache"
    prompts = validate_generation.validated_prompts(exported, tokenizer, info, max_tokens)
    caches, tokens, single_steps = [], [], []
    for ids in prompts:
        n = len(ids)
        whole = graph.run(validate_generation.feed(ids, graph.empty_past(1)))
        if n > 1:  # a one-token prompt (--max-length 2) has no shorter prompt to step from
            # The last token as a cached step on top of the others.
            step = validate_generation.chunked_prefill(graph, ids, n - 1)
            report.add("cached step", step[:, -1], whole["logits"][:, -1], 1, n)
        if ids is prompts[-1] and n // 2:
            # Several tokens on top of a past, as a long prompt is prefilled in chunks.
            rest = validate_generation.chunked_prefill(graph, ids, n // 2)
            report.add("chunked prefill", rest, whole["logits"][:, n // 2 :], 1, n, n // 2)
        token = int(whole["logits"][0, -1].argmax())
        cache = validate_generation.as_past(whole)
        single_steps.append(graph.run(validate_generation.feed([token], cache, n))["logits"][0])
        caches.append(cache)
        tokens.append(token)
    if not graph.takes_positions:
        return report, [
            "the graph takes no position_ids, so the sidecar never pads its sequences into "
            "one decoding step (it batches sequences of one length only); no padded step was "
            "checked"
        ]
    lengths = [len(ids) for ids in prompts]
    report.add(
        "batched cached step",
        validate_generation.batched_step(graph, caches, tokens, lengths),
        single_steps,
        len(prompts),
        max(lengths) + 1,
        reference="each sequence's step alone",
    )
    return report, []


def validate_graph(
    source: Path,
    exported: Path,
    info: CheckpointInfo,
    facts: GraphFacts,
    tol: Tolerance,
    max_tokens: int,
    *,
    trust_remote_code: bool,
    bars: Bars = Bars(),  # frozen: one shared default is safe
) -> tuple[dict[str, Any], list[str]]:
    """The manifest's validation object for an imported graph, and notes for the user."""
    from transformers import AutoTokenizer

    # The tokenizer copied into the dir must give the source's own tokenizer's ids.
    tokenizer_check = validate.tokenizer_only(
        source, exported, info, tol, trust_remote_code=trust_remote_code
    )
    vocab = TextEncoder(exported, info.max_length).vocab_size
    structure = check_structure(info, facts, read_config(exported), vocab)
    notes: list[str] = []
    report = (
        ByServedOutputs(tol, embeddings=info.task is Task.EMBED, bars=bars)
        if batch_dependent(facts)
        else Report(tol)
    )
    if info.task.generative:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        report, notes = _decoder(exported, tokenizer, info, report, max_tokens)
    else:
        report = _encoder(exported, info, report, max_tokens)
    record = report.record()
    choices = record.pop("next_token", None)
    if report.tokens.positions:
        # A language model's next token; a classifier's or tagger's label per input or token.
        record["next_token" if info.task.generative else "labels"] = choices
    return {
        "compared": ONNX_SELF_CONSISTENCY,
        "validated_length": min(max_tokens, info.max_length),
        **record,
        "structure": structure,
        "cases": tokenizer_check["cases"] + record["cases"],
    }, notes

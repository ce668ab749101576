"""What a checkpoint is: its task, labels, pooling, max length and generation defaults, read
from its config files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export import generation
from export.errors import ExportError
from sidecar.models.manifest import Pooling, Task
from sidecar.tasks import pairs
from sidecar.tasks.embed import POOLING_MODES

# sentence-transformers Pooling flags -> the sidecar's pooling mode names.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
# Tokenizers without a real limit report a huge sentinel as model_max_length.
_NO_LIMIT = 1_000_000
# Where configs keep the number of learned positions, by model family.
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
# T5-style relative positions put no limit in the config; T5 was trained on 512 tokens.
_RELATIVE_DEFAULT = 512
# NLI models name their labels entailment / neutral / contradiction (some "ENTAILMENT",
# "entails"); zero-shot classification reads the entailment logit.


@dataclass(frozen=True)
class CheckpointInfo:
    """The facts the manifest needs from a checkpoint."""

    task: Task
    max_length: int
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    pooling: Pooling | None = None
    sentence_transformers: bool = False
    # Generation tasks: the manifest's `generation` object.
    generation: dict[str, Any] | None = None
    # Choices made for the user, printed as progress lines.
    notes: tuple[str, ...] = ()


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}): fix or replace the file") from None
    return data if isinstance(data, dict) else {}


def _st_modules(path: Path) -> list[dict[str, Any]]:
    file = path / "modules.json"
    return json.loads(file.read_text()) if file.is_file() else []


def _pooling(
    path: Path, modules: list[dict[str, Any]], override: str | None, *, normalize: bool | None
) -> tuple[Pooling, tuple[str, ...]]:
    """The pooling, and a note when it was chosen for a checkpoint that names none."""
    mode = override
    notes: tuple[str, ...] = ()
    pooling_dirs = [m["path"] for m in modules if m.get("type", "").endswith("models.Pooling")]
    if mode is None and pooling_dirs:
        config = path / pooling_dirs[0] / "config.json"
        if not config.is_file():
            raise ExportError(
                f"{path}/modules.json names a Pooling module in {pooling_dirs[0]}/, but "
                f"{config} is missing: copy the whole checkpoint, or pass --pooling"
            )
        flags = _json(config)
        modes = [name for flag, name in _POOLING_FLAGS.items() if flags.get(flag)]
        if len(modes) != 1:
            raise ExportError(
                f"{path / pooling_dirs[0]} combines pooling modes {modes or 'none'}; the sidecar "
                f"serves exactly one of {', '.join(POOLING_MODES)}: pass --pooling"
            )
        mode = modes[0]
    if mode is None:
        # A bare encoder (BertModel, XLMRobertaModel, ...): sentence-transformers loads one
        # with mean pooling too.
        mode = "mean"
        notes = (
            f"{path} names no pooling (no sentence-transformers Pooling module): embeddings "
            "are the mean of the token vectors, as sentence-transformers does; pass --pooling "
            f"to choose another of {', '.join(POOLING_MODES)}",
        )
    if mode not in POOLING_MODES:
        raise ExportError(f"pooling {mode!r} is not one of {', '.join(POOLING_MODES)}")
    if normalize is None:
        normalize = any(m.get("type", "").endswith("models.Normalize") for m in modules)
    return Pooling(mode=mode, normalize=normalize), notes


def _cross_encoder(path: Path, config: dict[str, Any]) -> bool:
    """Whether sentence-transformers saved the checkpoint as a CrossEncoder (a pair scorer)."""
    # sentence-transformers 5 writes modules.json plus config_sentence_transformers.json with
    # model_type CrossEncoder; 4.x put {"activation_fn": ...} under config.json's
    # "sentence_transformers"; older versions "sbert_ce_default_activation_function".
    if _json(path / "config_sentence_transformers.json").get("model_type") == "CrossEncoder":
        return True
    return isinstance(config.get("sentence_transformers"), dict) or bool(
        config.get("sbert_ce_default_activation_function")
    )


def _labels(config: dict[str, Any]) -> tuple[str, ...]:
    """id2label's names in id order; () when the config has none."""
    id2label = config.get("id2label") or {}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def _sequence_task(config: dict[str, Any]) -> Task:
    labels = _labels(config)
    if pairs.entailment_id(labels) >= 0:
        return Task.ZERO_SHOT
    # transformers writes id2label, not num_labels, to config.json; one output is a score.
    if (config.get("num_labels") or len(labels)) == 1:
        return Task.RERANK
    return Task.CLASSIFY


def detect_task(path: Path) -> Task:
    """feature-extraction for sentence-transformers and bare encoders, else by architecture.

    Sequence classifiers split three ways: an entailment label makes an NLI model (zero-shot),
    a single output a cross-encoder (rerank), anything else a classifier.
    """
    config = _json(path / "config.json")
    # A sentence-transformers 5 CrossEncoder also has modules.json: it is not an embedder.
    if _st_modules(path) and not _cross_encoder(path, config):
        return Task.EMBED
    architectures = config.get("architectures") or []
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return Task.EXTRACT_ENTITIES
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return _sequence_task(config)
    # Before the bare-encoder rule: GPT2LMHeadModel also ends in "Model".
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return Task.GENERATE
    # MarianMTModel is the one seq2seq LM not named ...ForConditionalGeneration.
    if config.get("is_encoder_decoder") and any(
        a.endswith(("ForConditionalGeneration", "MTModel")) for a in architectures
    ):
        return Task.SEQ2SEQ
    if any(a.endswith("Model") for a in architectures):
        return Task.EMBED
    raise ExportError(
        f"cannot tell the task of {path} (architectures {architectures}): pass --task "
        f"{' or '.join(t.value for t in Task)}"
    )


def inspect(
    path: Path,
    task: Task,
    max_length: int | None = None,
    pooling: str | None = None,
    *,
    normalize: bool | None = None,
) -> CheckpointInfo:
    """Read task-specific facts; flags override what the checkpoint says."""
    config = _json(path / "config.json")
    if not config:
        raise ExportError(f"{path} has no config.json: it is not a transformers checkpoint")
    modules = _st_modules(path)
    limit = _max_length(path, config, max_length, modules)
    if task.generative:
        defaults, said = generation.defaults(path, config, task, limit)
        return CheckpointInfo(task=task, max_length=limit, generation=defaults, notes=tuple(said))
    if task is Task.EMBED:
        chosen, notes = _pooling(path, modules, pooling, normalize=normalize)
        return CheckpointInfo(
            task=task,
            max_length=limit,
            pooling=chosen,
            sentence_transformers=bool(modules),
            notes=notes,
        )
    labels = _labels(config)
    if not labels:
        raise ExportError(f"{path}/config.json has no id2label: a classifier needs label names")
    _check_labels(path, task, labels)
    # Only a text classifier can be multi-label; the other tasks read logits their own way.
    multi = task is Task.CLASSIFY and config.get("problem_type") == "multi_label_classification"
    return CheckpointInfo(task=task, max_length=limit, labels=labels, multi_label=multi)


def _max_length(
    path: Path, config: dict[str, Any], given: int | None, modules: list[dict[str, Any]]
) -> int:
    """The max input length: the flag, else sentence-transformers', else the tokenizer's,
    else the position embeddings' (T5's relative buckets have a default); never past them."""
    positions = _positions(config)
    limit = given
    if limit is None and modules:
        limit = _json(path / "sentence_bert_config.json").get("max_seq_length")
    if limit is None:
        tokenizer_limit = _json(path / "tokenizer_config.json").get("model_max_length")
        if isinstance(tokenizer_limit, int) and tokenizer_limit < _NO_LIMIT:
            limit = tokenizer_limit
    if limit is None:
        limit = positions
    if limit is None and "relative_attention_num_buckets" in config:
        limit = _RELATIVE_DEFAULT
    if not isinstance(limit, int) or limit < 2:
        raise ExportError(f"cannot tell the max input length of {path}: pass --max-length")
    return limit if positions is None else min(limit, positions)


def _check_labels(path: Path, task: Task, labels: tuple[str, ...]) -> None:
    """Refuse a forced --task the checkpoint's outputs cannot serve."""
    if task is Task.ZERO_SHOT and pairs.entailment_id(labels) < 0:
        raise ExportError(
            f"{path} has no entailment label (labels {list(labels)}): zero-shot classification "
            "needs an NLI model whose labels include one starting with 'entail'"
        )
    if task is Task.RERANK and len(labels) != 1:
        raise ExportError(
            f"{path} has {len(labels)} outputs (labels {list(labels)}): reranking needs a "
            "cross-encoder with a single relevance score (num_labels 1)"
        )


def _positions(config: dict[str, Any]) -> int | None:
    """The learned positions: the hard limit on tokens the model can see at once."""
    if "relative_attention_num_buckets" in config:
        # T5 configs carry an n_positions the model does not use.
        return None
    for key in _POSITIONS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None

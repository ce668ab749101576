"""Checks that catch a broken model dir at load time instead of as silent garbage at call time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sidecar.errors import ModelLoadError
from sidecar.model_files import read_json_object
from sidecar.models.manifest import Manifest

# Inputs the sidecar knows how to feed from a tokenizer's output.
FEEDABLE_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json (an empty dict when absent)."""
    return read_json_object(model_dir / "config.json") or {}


def preflight(
    model_dir: Path,
    manifest: Manifest,
    vocab_size: int,
    pad_id: int | None,
    input_names: Iterable[str],
    task_checks: Callable[[Path, Manifest], None] | None = None,
) -> None:
    """Raise ModelLoadError naming the first problem that would make the model misbehave.

    What a task itself needs of the dir (labels, pooling) its task module knows:
    `task_checks` runs those once the graph's inputs are known to be feedable.
    """
    config = read_config(model_dir)
    model_vocab = config.get("vocab_size")
    if isinstance(model_vocab, int) and vocab_size > model_vocab:
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has {vocab_size} tokens but the model's embedding "
            f"table has {model_vocab} (config.vocab_size): the tokenizer does not belong to "
            "this model; export tokenizer and weights from the same checkpoint"
        )
    # Generation runs one sequence per prompt and never pads one.
    if pad_id is None and not manifest.task.generative:
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has no pad token, so inputs cannot be batched; "
            "set pad_token in tokenizer_config.json and re-export"
        )
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and manifest.max_length > positions:
        raise ModelLoadError(
            f"{model_dir}: max_length {manifest.max_length} exceeds the model's "
            f"{positions} position embeddings; re-export with --max-length {positions} or less"
        )
    if manifest.max_length < 2:
        raise ModelLoadError(
            f"{model_dir}: max_length {manifest.max_length} leaves no room for text"
        )
    unknown = set(input_names) - FEEDABLE_INPUTS
    if unknown:
        raise ModelLoadError(
            f"{model_dir}: the ONNX graph needs inputs {sorted(unknown)} the sidecar cannot "
            f"feed (it feeds {sorted(FEEDABLE_INPUTS)})"
        )
    if task_checks is not None:
        task_checks(model_dir, manifest)
    suppressed = manifest.generation.suppressed_token_ids if manifest.generation else ()
    table = model_vocab if isinstance(model_vocab, int) else vocab_size
    outside = sorted(i for i in suppressed if not 0 <= i < table)
    if outside:
        raise ModelLoadError(
            f"{model_dir}: the manifest suppresses tokens {outside}, outside the model's "
            f"vocabulary of {table}: re-export the model dir"
        )

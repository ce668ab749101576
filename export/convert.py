"""The ONNX conversion itself, through optimum's exporter."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from export.errors import ExportError
from sidecar.models.manifest import Task

# optimum's task names; generation is exported with its KV cache as graph inputs and outputs.
OPTIMUM_TASKS = {
    Task.EMBED: "feature-extraction",
    Task.CLASSIFY: "text-classification",
    Task.EXTRACT_ENTITIES: "token-classification",
    # Cross-encoders and NLI models are sequence classifiers fed a pair of texts: the graph is
    # the same, only the tokenizer's input differs.
    Task.RERANK: "text-classification",
    Task.ZERO_SHOT: "text-classification",
    Task.GENERATE: "text-generation-with-past",
    Task.SEQ2SEQ: "text2text-generation-with-past",
}
# What the sidecar serves, by task: (graph, encoder graph). optimum also writes a decoder
# without past and one with past for seq2seq; the merged decoder does the work of both.
SERVED = {
    Task.EMBED: ("model.onnx", ""),
    Task.CLASSIFY: ("model.onnx", ""),
    Task.EXTRACT_ENTITIES: ("model.onnx", ""),
    Task.RERANK: ("model.onnx", ""),
    Task.ZERO_SHOT: ("model.onnx", ""),
    Task.GENERATE: ("model.onnx", ""),
    Task.SEQ2SEQ: ("decoder_model_merged.onnx", "encoder_model.onnx"),
}
_UNSERVED = ("decoder_model.onnx", "decoder_with_past_model.onnx")


def unsupported(source: Path, task: Task) -> str | None:
    """Why optimum cannot export this checkpoint's architecture for the task; None if it can."""
    # Importing main_export registers optimum-onnx's per-architecture export configs.
    from optimum.exporters.onnx import main_export  # noqa: F401
    from optimum.exporters.tasks import TasksManager

    config = json.loads((source / "config.json").read_text())
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return f"{source}/config.json names no model_type"
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        # optimum's own answer for an architecture it has no ONNX export config for.
        return f"optimum has no ONNX export for model type {model_type!r}"
    if OPTIMUM_TASKS[task] not in tasks:
        return (
            f"optimum exports model type {model_type!r} as {', '.join(tasks)}, "
            f"not as {OPTIMUM_TASKS[task]}"
        )
    return None


def _with_position_ids(source: Path, task: Task, *, trust_remote_code: bool) -> dict[str, Any]:
    """optimum's ONNX config plus a position_ids input, for decoders whose config has none.

    Without position ids the graph counts positions from the past's length, so a sequence
    left-padded into a batched decoding step reads its tokens at the wrong positions (optimum
    leaves them out for Gemma, Gemma 2 and 3, among others). Models that take no position ids
    (ALiBi ones, such as Bloom) keep optimum's config.
    """
    if task is not Task.GENERATE:
        return {}
    import inspect

    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx",
        model_type=config.model_type,
        task=OPTIMUM_TASKS[task],
        library_name="transformers",
    )
    if "position_ids" in constructor(config).inputs:
        return {}
    try:
        model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return {}
    if "position_ids" not in inspect.signature(model_class.forward).parameters:
        return {}
    base = constructor.func  # a functools.partial over optimum's config class

    class WithPositionIds(base):  # type: ignore[misc, valid-type]
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            found: dict[str, dict[int, str]] = super().inputs
            found["position_ids"] = {0: "batch_size", 1: "sequence_length"}
            return found

    # As optimum builds the with-past decoder's config (get_decoder_models_for_export).
    return {
        "model": WithPositionIds(
            config, task="text-generation", use_past=True, use_past_in_inputs=True
        )
    }


def to_onnx(
    source: Path, out: Path, task: Task, opset: int | None, *, trust_remote_code: bool
) -> tuple[Path, Path | None]:
    """Export the checkpoint into `out` (tokenizer and config beside it); return the served
    graph and, for seq2seq, the encoder graph."""
    from optimum.exporters.onnx import main_export
    from torch.jit import TracerWarning  # type: ignore[attr-defined]  # exported, not in __all__

    with warnings.catch_warnings():
        # torch's tracer and optimum warn about their own internals (the legacy exporter,
        # traced constants); neither the user nor this code can act on them.
        for category in (DeprecationWarning, FutureWarning, TracerWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        try:
            main_export(
                str(source),
                output=str(out),
                task=OPTIMUM_TASKS[task],
                # Pooling and normalization stay in the sidecar (numpy): export the bare model.
                library_name="transformers",
                opset=opset,
                device="cpu",
                # export/validate.py checks the exported model through the serving code instead.
                do_validation=False,
                trust_remote_code=trust_remote_code,
                custom_onnx_configs=_with_position_ids(
                    source, task, trust_remote_code=trust_remote_code
                )
                or None,
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ExportError(f"optimum could not export {source} as {task.value}: {exc}") from exc
    for name in _UNSERVED:
        # With any external-data file beside it (graphs over 2 GB).
        for path in out.glob(f"{name}*"):
            path.unlink()
    graph, encoder = SERVED[task]
    missing = [name for name in (graph, encoder) if name and not (out / name).is_file()]
    if missing:
        written = sorted(p.name for p in out.iterdir())
        raise ExportError(f"optimum wrote no {', '.join(missing)} for {source} ({written})")
    return out / graph, (out / encoder if encoder else None)

"""The whole export: checkpoint in, validated model dir with its manifest out."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from export import checkpoint, convert, generation, quality, source, validate, weights
from export.checkpoint import CheckpointInfo
from export.progress import Progress
from export.quantize import CHOICES, quantize_int8
from sidecar.errors import ExportError
from sidecar.models.manifest import MANIFEST, Task, format_version, sha256_file

# sentence-transformers files kept beside the model for people reading the dir.
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# auto: ONNX, or PyTorch when optimum cannot export the architecture; both: ONNX plus the
# safetensors weights, so one dir can be served by either backend.
BACKENDS = ("auto", "onnx", "torch", "both")
# Config keys that hold the hidden size, for the dimensions of an embedder without ONNX.
_HIDDEN = ("hidden_size", "d_model", "n_embd")
_VERSIONS = (
    "transformers-sidecar",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "tokenizers",
)


def _versions() -> dict[str, str]:
    found = {}
    for package in _VERSIONS:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _opset(model: Path) -> int:
    import onnx

    graph = onnx.load(str(model), load_external_data=False)
    return max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _dimensions(model: Path | None, config: Path) -> int:
    if model is None:
        values = json.loads(config.read_text())
        return next((values[k] for k in _HIDDEN if isinstance(values.get(k), int)), 0)
    import onnxruntime as ort

    shape = (
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_outputs()[0].shape
    )
    return shape[-1] if isinstance(shape[-1], int) else 0


def _check_bar(flag: str, value: float) -> None:
    # A NaN or out-of-range bar would pass or fail every model regardless of its quality.
    if not 0.0 <= value <= 1.0:
        raise ExportError(f"{flag} must be between 0 and 1, not {value}")


def _to_int8(
    staging: Path, model: Path, info: CheckpointInfo, min_cosine: float, min_agreement: float
) -> dict[str, Any]:
    """Replace staging's fp32 model with its int8 one if it is close enough to fp32."""
    int8 = model.with_name(f"{model.stem}.int8{model.suffix}")
    settings = quantize_int8(model, int8)
    measured = quality.measure(staging, model, int8, info)
    quality.check(measured, info.task, min_cosine, min_agreement)
    # The served file keeps its name: the manifest's onnx_file is what the sidecar loads.
    int8.replace(model)
    # The bar the measurement had to clear, under the name of the value it bounds.
    gate = (
        {"cosine_min": min_cosine} if info.task is Task.EMBED else {"top1_agreement": min_agreement}
    )
    return {**settings, "quality": {**measured, "gate": gate}}


def _plan(
    backend: str, src: Path, info: CheckpointInfo, int8: bool, progress: Progress
) -> tuple[bool, bool]:
    """Whether the dir gets an ONNX graph and whether it gets the torch backend's weights."""
    # export/quality.py measures embeddings (cosine) and label probabilities (top-1) of single
    # texts; per-token tags and pair scores have no such measure yet, so int8 is refused.
    if int8 and info.task not in (Task.EMBED, Task.CLASSIFY):
        raise ExportError(
            f"--quantize int8 covers embedding and classification models only, not "
            f"{info.task.value}: export without --quantize"
        )
    onnx, torch = backend != "torch", backend in ("torch", "both")
    if onnx:
        reason = convert.unsupported(src, info.task)
        if reason and (backend != "auto" or int8):
            needs = "--quantize int8 needs an ONNX model" if int8 else "pass --backend torch"
            raise ExportError(f"cannot export {src} to ONNX: {reason}; {needs}")
        if reason:
            weights.require_safetensors(src, f"{reason}, so PyTorch would serve the weights")
            progress.note(f"{reason}: falling back to the PyTorch backend (--backend torch)")
            return False, True
    if torch:
        also = "also " if onnx else ""
        weights.require_safetensors(
            src, f"--backend {backend} {also}serves the weights with PyTorch"
        )
    return onnx, torch


def export_model(
    name_or_path: str,
    out: Path,
    *,
    task: Task | None = None,
    revision: str | None = None,
    name: str | None = None,
    max_length: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    atol: float = 1e-4,
    opset: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    force: bool = False,
    backend: str = "auto",
    quantize: str = "none",
    int8_min_cosine: float = 0.99,
    int8_min_agreement: float = 0.9,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a checkpoint into `out` and return its manifest; a failure leaves `out` untouched."""
    if quantize not in CHOICES:
        raise ExportError(f"--quantize {quantize!r} is not one of {', '.join(CHOICES)}")
    if backend not in BACKENDS:
        raise ExportError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if quantize == "int8" and backend == "torch":
        raise ExportError("--quantize int8 quantizes the ONNX model; --backend torch has none")
    _check_bar("--int8-min-cosine", int8_min_cosine)
    _check_bar("--int8-min-agreement", int8_min_agreement)
    int8 = quantize == "int8"
    progress = progress or Progress(6 if int8 else 5)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with progress.step(f"finding checkpoint {name_or_path}"):
            src = source.resolve(name_or_path, revision, allow_pickle, trust_remote_code)
            chosen = task or checkpoint.detect_task(src.path)
            info = checkpoint.inspect(src.path, chosen, max_length, pooling, normalize)
            onnx, torch = _plan(backend, src.path, info, int8, progress)
        model: Path | None = None
        encoder: Path | None = None
        with progress.step(_convert_step(chosen, onnx, torch)):
            if onnx:
                model, encoder = convert.to_onnx(
                    src.path, staging, chosen, opset, trust_remote_code
                )
            else:
                weights.copy_model_files(src.path, staging, trust_remote_code)
            weight_files = weights.copy_weights(src.path, staging) if torch else []
            for extra in _ST_FILES:
                if (src.path / extra).is_file():
                    shutil.copy2(src.path / extra, staging / extra)
            chat_template = generation.write_chat_template(staging) if chosen.generative else ""
        checking = (
            f"validating against PyTorch (atol {atol:.0e})" if onnx else "checking the tokenizer"
        )
        with progress.step(checking):
            validation = validate.validate(src.path, staging, info, atol, trust_remote_code, onnx)
        quantization: str | dict[str, Any] = "none"
        if int8:
            assert model is not None  # _plan refuses int8 without ONNX
            with progress.step("quantizing to int8 (dynamic) and comparing it with fp32"):
                quantization = _to_int8(staging, model, info, int8_min_cosine, int8_min_agreement)
        with progress.step("writing manifest with checksums"):
            manifest = {
                "format_version": 0,  # set below, once the manifest is complete
                "name": name or out.name,
                "task": chosen.value,
                "source": src.manifest_entry(),
                "exported_by": _versions(),
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "onnx_file": model.name if model else "",
                "onnx_encoder_file": encoder.name if encoder else "",
                "weights": weight_files,
                "opset": _opset(model) if model else 0,
                "quantization": quantization,
                "max_length": info.max_length,
                "labels": list(info.labels),
                "multi_label": info.multi_label,
                "pooling": (
                    {"mode": info.pooling.mode, "normalize": info.pooling.normalize}
                    if info.pooling
                    else None
                ),
                "dimensions": (
                    _dimensions(model, staging / "config.json") if chosen is Task.EMBED else 0
                ),
                "generation": info.generation,
                "chat_template": chat_template,
                "validation": validation,
                "files": {
                    str(p.relative_to(staging)): {
                        "sha256": sha256_file(p),
                        "bytes": p.stat().st_size,
                    }
                    for p in sorted(staging.rglob("*"))
                    if p.is_file()
                },
            }
            manifest["format_version"] = format_version(manifest)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        with progress.step(f"moving the model dir into place at {out}"):
            # Renames only, so a crash leaves either the old dir or the new one, never neither.
            previous = out.with_name(f".{out.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            if out.exists():
                out.rename(previous)
            staging.rename(out)
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _convert_step(task: Task, onnx: bool, torch: bool) -> str:
    if not onnx:
        return "copying safetensors weights, config and tokenizer for the PyTorch backend"
    also = " and copying the safetensors weights" if torch else ""
    return f"exporting {task.value} to ONNX with optimum{also}"

"""The whole export: checkpoint in, validated model dir with its manifest out."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from export import (
    checkpoint,
    convert,
    fast_tokenizer,
    generation,
    gguf,
    imported,
    quality,
    source,
    swap,
    validate,
    validate_imported,
    weights,
)
from export.checkpoint import CheckpointInfo
from export.compare import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    VALIDATED_TOKENS,
    Tolerance,
    check_bounds,
)
from export.errors import ExportError
from export.progress import Progress
from export.quantize import CHOICES, quantize_int8
from sidecar.errors import ModelLoadError
from sidecar.model_files import check_contained
from sidecar.models.manifest import Task, write_manifest

# sentence-transformers files kept beside the model for people reading the dir.
_ST_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
# auto: ONNX, or PyTorch when optimum cannot export the architecture; both: ONNX plus the
# safetensors weights, so one dir can be served by either backend.
BACKENDS = ("auto", "onnx", "torch", "both")
# The name an imported graph gets in the model dir, as the sidecar's own exports name it.
SERVED_GRAPH = "model.onnx"
# Config keys that hold the hidden size, for the dimensions of an embedder without ONNX.
_HIDDEN = ("hidden_size", "d_model", "n_embd")
# The packages whose versions shape a model dir, recorded as `exported_by`.
_VERSIONS = (
    "transformers-sidecar",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "safetensors",
    "numpy",
    "gguf",
    "accelerate",
    "sentencepiece",
)


def versions() -> dict[str, str]:
    """The installed versions of the packages an export depends on."""
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
    backend: str, src: Path, info: CheckpointInfo, *, int8: bool, progress: Progress
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
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    validate_tokens: int = VALIDATED_TOKENS,
    opset: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    force: bool = False,
    backend: str = "auto",
    quantize: str = "none",
    onnx_file: str | None = None,
    int8_min_cosine: float | None = None,
    int8_min_agreement: float | None = None,
    follow_symlinks: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a checkpoint into `out` and return its manifest; a failure leaves `out` untouched."""
    tol = _check_options(
        quantize,
        backend,
        (atol, rtol),
        validate_tokens,
        (int8_min_cosine, int8_min_agreement),
    )
    int8 = quantize == "int8"
    # A GGUF source takes one step more: dequantizing it.
    progress = progress or Progress(5 + int8 + _local_gguf(name_or_path))
    staging, dequantized = _work_dirs(out, progress, force=force)
    try:
        with progress.step(f"finding checkpoint {name_or_path}"):
            src = source.resolve(
                name_or_path,
                revision,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                onnx_file=onnx_file,
                follow_symlinks=follow_symlinks,
            )
            path = src.path
            if src.gguf is None:
                info = _read(
                    path, task, max_length, pooling, normalize=normalize, progress=progress
                )
        if src.gguf is not None:
            progress.total = max(progress.total, 6 + int8)  # a caller's Progress may not know
            with progress.step(f"dequantizing {src.gguf.name} into a transformers checkpoint"):
                dequantized.mkdir(parents=True)
                for note in gguf.to_checkpoint(src.gguf, dequantized, task):
                    progress.note(note)
                path = dequantized
                info = _read(
                    path, task, max_length, pooling, normalize=normalize, progress=progress
                )
        if src.onnx_graph is not None:
            defaults = validate_imported.Bars()
            bars = validate_imported.Bars(
                defaults.min_cosine if int8_min_cosine is None else int8_min_cosine,
                defaults.min_agreement if int8_min_agreement is None else int8_min_agreement,
            )
            built = _imported(
                src.onnx_graph,
                path,
                staging,
                info,
                backend,
                quantize,
                tol,
                validate_tokens,
                trust_remote_code=trust_remote_code,
                progress=progress,
                bars=bars,
            )
        else:
            built = _exported(
                path,
                staging,
                info,
                backend,
                int8=int8,
                opset=opset,
                tol=tol,
                validate_tokens=validate_tokens,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
            if int8:
                assert built.model is not None  # _plan refuses int8 without ONNX
                with progress.step("quantizing to int8 (dynamic) and comparing it with fp32"):
                    built.quantization = _to_int8(
                        staging,
                        built.model,
                        info,
                        quality.MIN_COSINE if int8_min_cosine is None else int8_min_cosine,
                        quality.MIN_AGREEMENT if int8_min_agreement is None else int8_min_agreement,
                    )
        with progress.step("writing manifest with checksums"):
            fields = _manifest_fields(name or out.name, src, info, built, staging)
            manifest = write_manifest(staging, fields)
        with progress.step(f"moving the model dir into place at {out}"):
            contained(staging)
            swap.install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(dequantized, ignore_errors=True)
    return manifest


def _check_options(
    quantize: str,
    backend: str,
    tolerances: tuple[float, float],
    validate_tokens: int,
    int8_bars: tuple[float | None, float | None],
) -> Tolerance:
    """Refuse flags that cannot go together, before any work; the validation's tolerance."""
    if quantize not in CHOICES:
        raise ExportError(f"--quantize {quantize!r} is not one of {', '.join(CHOICES)}")
    if backend not in BACKENDS:
        raise ExportError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if quantize == "int8" and backend == "torch":
        raise ExportError("--quantize int8 quantizes the ONNX model; --backend torch has none")
    tol = check_bounds(*tolerances)
    if validate_tokens < 2:
        raise ExportError(f"--validate-tokens must be 2 or more, not {validate_tokens}")
    for flag, bar in zip(("--int8-min-cosine", "--int8-min-agreement"), int8_bars, strict=True):
        if bar is not None:
            _check_bar(flag, bar)
    return tol


def _work_dirs(out: Path, progress: Progress, *, force: bool) -> tuple[Path, Path]:
    """A fresh staging dir beside `out`, and where a GGUF source is dequantized first.

    What an earlier export left is dealt with first: a stranded old dir put back, and the
    work dirs of one killed before its end removed.
    """
    recovered = swap.recover(out)
    if recovered:
        progress.note(recovered)
    if swap.present(out) and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it")
    staging = out.with_name(f".{out.name}.partial")
    dequantized = out.with_name(f".{out.name}.gguf-checkpoint")
    for work in (staging, dequantized):
        swap.remove(work)
    staging.mkdir(parents=True)
    return staging, dequantized


def contained(model_dir: Path) -> None:
    """The dir written is one the server will take: its own files only, no links out."""
    try:
        check_contained(model_dir)
    except ModelLoadError as exc:
        raise ExportError(f"the export wrote a dir the server would refuse: {exc}") from None


def _local_gguf(name_or_path: str) -> bool:
    try:
        return gguf.find(Path(name_or_path).expanduser()) is not None
    except ExportError:  # several GGUF files: resolve() says so in its own step
        return False


def _read(
    path: Path,
    task: Task | None,
    max_length: int | None,
    pooling: str | None,
    *,
    normalize: bool | None,
    progress: Progress,
) -> CheckpointInfo:
    """The checkpoint's task and facts, with the choices made for the user said aloud."""
    chosen = task or checkpoint.detect_task(path)
    info = checkpoint.inspect(path, chosen, max_length, pooling, normalize=normalize)
    for note in info.notes:
        progress.note(note)
    return info


@dataclass
class _Built:
    """What the conversion put in the staging dir, for the manifest."""

    model: Path | None
    encoder: Path | None
    weights: list[str]
    chat_template: str
    validation: dict[str, Any]
    quantization: str | dict[str, Any] = "none"


def _extras(src: Path, staging: Path, info: CheckpointInfo, *, trust_remote_code: bool) -> str:
    """sentence-transformers files, tokenizer.json and the chat template beside the model;
    returns the chat template's file name ("" if none)."""
    for extra in _ST_FILES:
        if (src / extra).is_file():
            (staging / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / extra, staging / extra)
    fast_tokenizer.ensure(src, staging, trust_remote_code=trust_remote_code)
    return generation.write_chat_template(staging) if info.task.generative else ""


def _exported(
    src: Path,
    staging: Path,
    info: CheckpointInfo,
    backend: str,
    *,
    int8: bool,
    opset: int | None,
    tol: Tolerance,
    validate_tokens: int,
    trust_remote_code: bool,
    progress: Progress,
) -> _Built:
    """Steps 2 and 3 from PyTorch weights: ONNX (and/or the weights), validated."""
    onnx, torch = _plan(backend, src, info, int8=int8, progress=progress)
    model: Path | None = None
    encoder: Path | None = None
    with progress.step(_convert_step(info.task, onnx=onnx, torch=torch)):
        if onnx:
            model, encoder = convert.to_onnx(
                src, staging, info.task, opset, trust_remote_code=trust_remote_code
            )
        else:
            weights.copy_model_files(src, staging, trust_remote_code=trust_remote_code)
        weight_files = weights.copy_weights(src, staging) if torch else []
        chat_template = _extras(src, staging, info, trust_remote_code=trust_remote_code)
    checking = (
        f"validating against PyTorch ({tol.describe()}, inputs of up to "
        f"{min(validate_tokens, info.max_length)} tokens)"
        if onnx
        else "checking the tokenizer"
    )
    with progress.step(checking):
        started = time.perf_counter()
        validation = validate.validate(
            src, staging, info, tol, validate_tokens, trust_remote_code=trust_remote_code, onnx=onnx
        )
        validation["seconds"] = round(time.perf_counter() - started, 1)
    return _Built(model, encoder, weight_files, chat_template, validation)


def _imported(
    graph: Path,
    src: Path,
    staging: Path,
    info: CheckpointInfo,
    backend: str,
    quantize: str,
    tol: Tolerance,
    validate_tokens: int,
    *,
    trust_remote_code: bool,
    progress: Progress,
    bars: validate_imported.Bars,
) -> _Built:
    """Steps 2 and 3 for a pre-exported graph: copied, then checked without PyTorch."""
    relative = graph.relative_to(src)
    if backend not in ("auto", "onnx"):
        raise ExportError(
            f"--backend {backend} serves PyTorch weights, and an imported graph ({relative}) "
            "comes without them: use --backend auto or onnx"
        )
    if quantize != "none":
        raise ExportError(
            f"--quantize applies to exports from PyTorch weights; {relative} is already "
            "exported: import it as it is, or pick a quantized variant with --onnx-file"
        )
    with progress.step(f"importing the pre-exported ONNX graph {relative}"):
        facts = imported.inspect_graph(graph)
        others = [g for g in imported.graphs(src) if g != str(relative)]
        if others:
            progress.note(f"other graphs there ({', '.join(others)}): --onnx-file picks one")
        weights.copy_model_files(src, staging, trust_remote_code=trust_remote_code)
        model = imported.copy_graph(graph, staging, SERVED_GRAPH)
        chat_template = _extras(src, staging, info, trust_remote_code=trust_remote_code)
    with progress.step(
        f"checking the graph without a PyTorch reference ({tol.describe()}): its inputs and "
        "outputs, tokenizer and embedding table, and itself alone against batched"
    ):
        started = time.perf_counter()
        validation, notes = validate_imported.validate_graph(
            src,
            staging,
            info,
            facts,
            tol,
            validate_tokens,
            trust_remote_code=trust_remote_code,
            bars=bars,
        )
        validation["seconds"] = round(time.perf_counter() - started, 1)
        for note in notes:
            progress.note(note)
    quantization: str | dict[str, Any] = "none"
    if facts.quantization != "none":
        quantization = {"mode": facts.quantization, "operators": list(facts.quantized_ops)}
    return _Built(model, None, [], chat_template, validation, quantization)


def _manifest_fields(
    name: str, src: source.Source, info: CheckpointInfo, built: _Built, staging: Path
) -> dict[str, Any]:
    """What manifest.json says of this export (write_manifest adds checksums and format)."""
    model = built.model
    return {
        "name": name,
        "task": info.task.value,
        "source": src.manifest_entry(),
        "exported_by": versions(),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "onnx_file": model.name if model else "",
        "onnx_encoder_file": built.encoder.name if built.encoder else "",
        "weights": built.weights,
        "opset": _opset(model) if model else 0,
        "quantization": built.quantization,
        "max_length": info.max_length,
        "labels": list(info.labels),
        "multi_label": info.multi_label,
        "pooling": (
            {"mode": info.pooling.mode, "normalize": info.pooling.normalize}
            if info.pooling
            else None
        ),
        "dimensions": (
            _dimensions(model, staging / "config.json") if info.task is Task.EMBED else 0
        ),
        "generation": info.generation,
        "chat_template": built.chat_template,
        "validation": built.validation,
    }


def _convert_step(task: Task, *, onnx: bool, torch: bool) -> str:
    if not onnx:
        return "copying safetensors weights, config and tokenizer for the PyTorch backend"
    also = " and copying the safetensors weights" if torch else ""
    return f"exporting {task.value} to ONNX with optimum{also}"

"""The whole export: checkpoint in, validated model dir with its manifest out."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from export import checkpoint, convert, source, validate
from export.progress import Progress
from sidecar.errors import ExportError
from sidecar.models.manifest import FORMAT_VERSION, MANIFEST, Task, sha256_file

# sentence-transformers files kept beside the model for people reading the dir.
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
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


def _dimensions(model: Path) -> int:
    import onnxruntime as ort

    shape = (
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_outputs()[0].shape
    )
    return shape[-1] if isinstance(shape[-1], int) else 0


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
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a checkpoint into `out` and return its manifest; a failure leaves `out` untouched."""
    progress = progress or Progress(5)
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
        with progress.step(f"exporting {chosen.value} to ONNX with optimum"):
            model = convert.to_onnx(src.path, staging, chosen, opset, trust_remote_code)
            for extra in _ST_FILES:
                if (src.path / extra).is_file():
                    shutil.copy2(src.path / extra, staging / extra)
        with progress.step(f"validating against PyTorch (atol {atol:.0e})"):
            validation = validate.validate(src.path, staging, info, atol, trust_remote_code)
        with progress.step("writing manifest with checksums"):
            manifest = {
                "format_version": FORMAT_VERSION,
                "name": name or out.name,
                "task": chosen.value,
                "source": src.manifest_entry(),
                "exported_by": _versions(),
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "onnx_file": model.name,
                "opset": _opset(model),
                "quantization": "none",
                "max_length": info.max_length,
                "labels": list(info.labels),
                "multi_label": info.multi_label,
                "pooling": (
                    {"mode": info.pooling.mode, "normalize": info.pooling.normalize}
                    if info.pooling
                    else None
                ),
                "dimensions": _dimensions(model) if chosen is Task.EMBED else 0,
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

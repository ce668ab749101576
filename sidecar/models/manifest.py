"""manifest.json: what a model dir holds, where it came from, and how it was validated.

`export/` writes it; the server reads it and refuses a dir whose files do not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sidecar.errors import ChecksumMismatchError, ModelLoadError

MANIFEST = "manifest.json"
# Bumped only when a reader of the old format would misread the new one.
# 2: `quantization` may be an object (mode, settings, quality) instead of a string.
FORMAT_VERSION = 2
_CHUNK = 1 << 20


class Task(StrEnum):
    """What a model dir serves; the values are Hugging Face task names."""

    EMBED = "feature-extraction"
    CLASSIFY = "text-classification"


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one embedding (sentence-transformers' Pooling module)."""

    mode: str  # mean | cls | max | mean_sqrt_len | lasttoken
    normalize: bool  # whether Embed normalizes by default


@dataclass(frozen=True)
class Validation:
    """The export-time comparison of ONNX outputs with the PyTorch model."""

    atol: float
    max_abs_diff: float
    cases: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest of one model dir."""

    name: str
    task: Task
    onnx_file: str
    files: dict[str, str]  # relative path -> sha256 hex
    max_length: int
    source: str
    source_revision: str | None = None
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    pooling: Pooling | None = None
    dimensions: int = 0
    quantization: str = "none"  # none | int8-dynamic
    # What export measured against the fp32 model (cosine_min, top1_agreement, ...); {} for fp32.
    quantization_quality: dict[str, Any] = field(default_factory=dict)
    opset: int = 0
    exported_by: dict[str, str] = field(default_factory=dict)
    validation: Validation | None = None
    digest: str = ""  # sha256 of manifest.json itself


def format_version(quantization: str | dict[str, Any]) -> int:
    """The oldest format that holds this manifest's quantization entry."""
    # So sidecars that predate quantized exports still read fp32 dirs, and refuse quantized
    # ones with "upgrade the sidecar" instead of misreading them.
    return 1 if isinstance(quantization, str) else FORMAT_VERSION


def _quantization(entry: Any) -> tuple[str, dict[str, Any]]:
    """Mode and measured quality from a format 1 string or a format 2 object."""
    if not entry:
        return "none", {}
    if isinstance(entry, str):
        return entry, {}
    return str(entry["mode"]), dict(entry.get("quality") or {})


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _require(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ModelLoadError(f"{path} has no {key!r}: re-export the model with sidecar-export")
    return data[key]


def read_manifest(model_dir: Path) -> Manifest:
    """Parse model_dir/manifest.json; refuse missing, malformed or too-new manifests."""
    try:
        return _parse(model_dir)
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(
            f"{model_dir / MANIFEST} is malformed ({type(exc).__name__}: {exc}): "
            "re-export the model dir"
        ) from None


def _parse(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(
            f"{model_dir} has no {MANIFEST}: it is not a model dir. "
            "Create one with: sidecar-export <checkpoint> <model-dir>"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}): re-export the model") from None
    version = _require(data, "format_version", path)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path} has format_version {version!r}, newer than this sidecar reads "
            f"({FORMAT_VERSION}): upgrade the sidecar or export with a matching sidecar-export"
        )
    task_name = _require(data, "task", path)
    try:
        task = Task(task_name)
    except ValueError:
        known = ", ".join(t.value for t in Task)
        raise ModelLoadError(f"{path}: task {task_name!r} is not served; known: {known}") from None
    pooling = data.get("pooling")
    validation = data.get("validation")
    source = _require(data, "source", path)
    quantization, quality = _quantization(data.get("quantization"))
    return Manifest(
        name=_require(data, "name", path),
        task=task,
        onnx_file=_require(data, "onnx_file", path),
        files={rel: entry["sha256"] for rel, entry in _require(data, "files", path).items()},
        max_length=int(_require(data, "max_length", path)),
        source=source.get("hub_id") or source.get("path") or "",
        source_revision=source.get("revision"),
        labels=tuple(data.get("labels") or ()),
        multi_label=bool(data.get("multi_label", False)),
        pooling=Pooling(pooling["mode"], bool(pooling["normalize"])) if pooling else None,
        dimensions=int(data.get("dimensions") or 0),
        quantization=quantization,
        quantization_quality=quality,
        opset=int(data.get("opset") or 0),
        exported_by=dict(data.get("exported_by") or {}),
        validation=(
            Validation(
                atol=float(validation["atol"]),
                max_abs_diff=float(validation["max_abs_diff"]),
                cases=tuple(validation.get("cases") or ()),
            )
            if validation
            else None
        ),
        digest="sha256:" + hashlib.sha256(raw).hexdigest(),
    )


def verify_files(model_dir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its sha256."""
    for rel, expected in manifest.files.items():
        path = model_dir / rel
        if not path.is_file():
            raise ModelLoadError(
                f"{path} is listed in the manifest but missing: copy the whole model dir"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumMismatchError(
                f"{path} does not match its manifest (sha256 {actual[:12]}…, expected "
                f"{expected[:12]}…): the file was changed or damaged; re-export the model dir"
            )

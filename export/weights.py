"""The PyTorch backend's share of a model dir: the checkpoint's safetensors weights and, for
dirs without ONNX, the config and tokenizer files optimum would otherwise have written."""

from __future__ import annotations

import shutil
from pathlib import Path

from export import fast_tokenizer
from export.errors import ExportError

# Copied as they are: the model's own settings, which the torch backend loads with it.
_CONFIGS = ("config.json", "generation_config.json")


def has_weights(path: Path) -> bool:
    """Whether a dir holds PyTorch weights (safetensors, or pickles): an export starts from
    them before any GGUF file or ONNX graph beside them."""
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def require_safetensors(path: Path, why: str) -> None:
    """Refuse a torch-served dir for a pickle-only checkpoint, whatever --allow-pickle says."""
    if not any(path.glob("*.safetensors")):
        raise ExportError(
            f"{why}, which loads safetensors only, and {path} has none (pickle "
            "weights are never served): convert the checkpoint to safetensors"
        )


def copy_weights(source: Path, out: Path) -> list[str]:
    """Copy the safetensors weights (and a sharded checkpoint's index); return their names."""
    names = sorted(p.name for p in source.glob("*.safetensors"))
    for name in names:
        shutil.copy2(source / name, out / name)
    for index in source.glob("*.safetensors.index.json"):
        shutil.copy2(index, out / index.name)
    return names


def copy_model_files(source: Path, out: Path, *, trust_remote_code: bool) -> None:
    """Config and tokenizer for a dir without ONNX, saved as optimum saves them for ONNX."""
    from transformers import AutoTokenizer

    for name in _CONFIGS:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if trust_remote_code:
        # The checkpoint's modelling code, which config.json's auto_map points at.
        for code in source.glob("*.py"):
            shutil.copy2(code, out / code.name)
    # Saved through transformers, not copied: a checkpoint with only a slow tokenizer gets
    # the tokenizer.json the sidecar reads, exactly as an ONNX export does (or one built here
    # where transformers has no fast version).
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(out)
    fast_tokenizer.ensure(source, out, trust_remote_code=trust_remote_code)

"""GGUF sources: a llama.cpp model file, dequantized by transformers into a checkpoint that
the rest of the export reads like any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export import weights
from export.errors import ExportError
from sidecar.models.manifest import Task

SUFFIX = ".gguf"
# GGUF tokenizer metadata -> the transformers tokenizer attribute it sets.
_SPECIAL_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}
_FLAGS = {
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
}


def find(path: Path) -> Path | None:
    """The GGUF file a source names: the file itself, or the one .gguf in a dir that holds
    no transformers weights; None when the source is no GGUF."""
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if not path.is_dir() or weights.has_weights(path):
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ExportError(
            f"{path} holds {len(files)} GGUF files ({names}): pass the one to export, "
            f"for example {path / files[0].name}"
        )
    return files[0] if files else None


def _metadata(gguf: Path) -> dict[str, Any]:
    """The GGUF's tokenizer fields that transformers' conversion may get wrong."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    found = {}
    for key in (*_SPECIAL_IDS, *_FLAGS):
        field = reader.fields.get(key)
        if field is not None:
            found[key] = field.contents()
    return found


def _follow_metadata(tokenizer: Any, metadata: dict[str, Any]) -> list[str]:
    """Set the special tokens and add-BOS/EOS flags the GGUF names; return what changed.

    transformers 4.57 reads some GPT-2-style GGUF tokenizers (SmolLM2's among them) with
    the BOS token as EOS and a BOS added to every text, where the file says otherwise.
    """
    changed = []
    for key, attribute in _SPECIAL_IDS.items():
        if key not in metadata:
            continue
        token = tokenizer.convert_ids_to_tokens(int(metadata[key]))
        if isinstance(token, str) and getattr(tokenizer, attribute) != token:
            changed.append(f"{attribute} {getattr(tokenizer, attribute)!r} -> {token!r}")
            setattr(tokenizer, attribute, token)
    for key, attribute in _FLAGS.items():
        if key in metadata and hasattr(tokenizer, attribute):
            wanted = bool(metadata[key])
            if getattr(tokenizer, attribute) != wanted:
                changed.append(f"{attribute} {getattr(tokenizer, attribute)} -> {wanted}")
                # Llama-style fast tokenizers rebuild their post-processor from this flag.
                setattr(tokenizer, attribute, wanted)
    if "tokenizer.ggml.add_bos_token" in metadata and tokenizer.bos_token is not None:
        # Other tokenizer classes keep the flag as a plain attribute: say so if it took no hold.
        wanted = bool(metadata["tokenizer.ggml.add_bos_token"])
        ids = tokenizer("a")["input_ids"]
        if bool(ids) and (ids[0] == tokenizer.bos_token_id) != wanted:
            changed.append(
                f"but {type(tokenizer).__name__} {'adds no' if wanted else 'still adds a'} BOS "
                f"where the file says add_bos_token {str(wanted).lower()}"
            )
    return changed


def to_checkpoint(gguf: Path, out: Path, task: Task | None) -> list[str]:
    """Dequantize the GGUF into a safetensors checkpoint in `out` (config, weights, generation
    config, tokenizer.json, chat template); return notes on what was corrected."""
    try:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ExportError(
            f"reading {gguf.name} needs the gguf and accelerate packages ({exc}): install the "
            "export extra, pip install 'transformers-sidecar[export]'"
        ) from None
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"transformers cannot read {gguf}: {exc}") from None
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    wanted = task or (Task.SEQ2SEQ if seq2seq else Task.GENERATE)
    if wanted is not (Task.SEQ2SEQ if seq2seq else Task.GENERATE):
        raise ExportError(
            f"{gguf.name} holds a {config.model_type} language model; a GGUF exports as "
            f"{'text2text-generation' if seq2seq else 'text-generation'}, not {wanted.value}"
        )
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise ExportError(f"transformers cannot load {gguf}: {exc}") from None
    changed = _follow_metadata(tokenizer, _metadata(gguf))
    model.save_pretrained(out, safe_serialization=True)
    # legacy_format=False writes tokenizer.json alone: the slow tokenizer's vocab file would
    # be a copy of the whole GGUF.
    tokenizer.save_pretrained(out, legacy_format=False)
    if not changed:
        return []
    return [
        f"following {gguf.name}'s tokenizer metadata where transformers read it otherwise: "
        + ", ".join(changed)
    ]

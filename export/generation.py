"""Generation tasks' extras: default generation settings and the chat template file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import ExportError
from sidecar.models.manifest import Task

CHAT_TEMPLATE = "chat_template.jinja"
# Without max_new_tokens or a usable max_length in the checkpoint.
DEFAULT_MAX_NEW_TOKENS = 256
# transformers' GenerationConfig defaults, so a checkpoint that leaves a setting out is served
# as model.generate() would run it (top_k is 50 there, not "no limit").
_SETTINGS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}
_TOKEN_IDS = (
    "pad_token_id",
    "bos_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


def _ids(value: Any) -> list[int]:
    """eos_token_id and friends may be one id or a list of them."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values]


def _first_id(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _suppressed(source: dict[str, Any], vocab: Any) -> tuple[list[int], list[str]]:
    """Tokens generate() never picks (single-token bad_words_ids, suppress_tokens), and notes
    on the settings the sidecar does not honour."""
    ids: set[int] = set(_ids(source.get("suppress_tokens")))
    notes = []
    words = source.get("bad_words_ids") or []
    longer = [w for w in words if isinstance(w, list) and len(w) > 1]
    ids.update(int(w[0]) for w in words if isinstance(w, list) and len(w) == 1)
    outside = sorted(i for i in ids if i < 0 or (isinstance(vocab, int) and i >= vocab))
    if outside:
        ids -= set(outside)
        notes.append(
            f"the generation config names tokens {outside} to suppress, outside the "
            f"vocabulary of {vocab}: ignored"
        )
    if longer:
        notes.append(
            f"bad_words_ids holds {len(longer)} sequences of more than one token: the sidecar "
            "suppresses single tokens only, so those may still be generated"
        )
    beams = source.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        notes.append(
            f"the checkpoint's generation config asks for beam search (num_beams {beams}); the "
            "sidecar decodes one sequence at a time (greedy, or sampling when asked for), so "
            "its output can differ from generate()'s with beams"
        )
    return sorted(ids), notes


def defaults(
    path: Path, config: dict[str, Any], task: Task, context: int
) -> tuple[dict[str, Any], list[str]]:
    """The manifest's `generation` object, from generation_config.json or else config.json,
    and notes on settings the sidecar cannot honour."""
    # As transformers does: the generation config file wins whole; without one, an older
    # checkpoint keeps its generation settings in config.json.
    file = path / "generation_config.json"
    source = json.loads(file.read_text()) if file.is_file() else config
    if not isinstance(source, dict):
        raise ExportError(f"{file} is not a JSON object")
    settings = {
        key: default if source.get(key) is None else type(default)(source[key])
        for key, default in _SETTINGS.items()
    }
    # Seq2seq max_length / min_length count the decoder start token; a decoder-only model's
    # count the prompt too, whose length is unknown here.
    seq2seq = task is Task.SEQ2SEQ
    max_new = source.get("max_new_tokens")
    if not isinstance(max_new, int) and seq2seq and isinstance(source.get("max_length"), int):
        max_new = source["max_length"] - 1
    if not isinstance(max_new, int) or max_new < 1:
        max_new = DEFAULT_MAX_NEW_TOKENS
    min_new = source.get("min_new_tokens")
    if not isinstance(min_new, int) and seq2seq and isinstance(source.get("min_length"), int):
        min_new = source["min_length"] - 1
    tokens = {key: _first_id(source.get(key)) for key in _TOKEN_IDS}
    if seq2seq and tokens["decoder_start_token_id"] is None:
        # transformers starts the decoder on BOS when no start token is named.
        tokens["decoder_start_token_id"] = tokens["bos_token_id"]
        if tokens["bos_token_id"] is None:
            raise ExportError(
                f"{path} names neither decoder_start_token_id nor bos_token_id: the decoder "
                "has no first token"
            )
    suppressed, notes = _suppressed(source, config.get("vocab_size"))
    return {
        # Past the context no token can be generated: a larger default would only mislead.
        "max_new_tokens": min(max_new, context - 1),
        **settings,
        "min_new_tokens": max(min_new, 0) if isinstance(min_new, int) else 0,
        "eos_token_ids": _ids(source.get("eos_token_id")),
        **tokens,
        "suppressed_token_ids": suppressed,
    }, notes


def _template_from_config(model_dir: Path) -> str | None:
    file = model_dir / "tokenizer_config.json"
    if not file.is_file():
        return None
    entry = json.loads(file.read_text()).get("chat_template")
    if isinstance(entry, list):
        # Several named templates: transformers uses "default" unless told which one.
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        entry = named.get("default")
    return entry if isinstance(entry, str) and entry else None


def write_chat_template(model_dir: Path) -> str:
    """Leave the chat template in model_dir/chat_template.jinja; return its name, "" if none."""
    file = model_dir / CHAT_TEMPLATE
    if file.is_file():
        return CHAT_TEMPLATE
    template = _template_from_config(model_dir)
    if template is None:
        return ""
    file.write_text(template)
    return CHAT_TEMPLATE

"""Generate: the request's prompt rendered, tokenized and fitted to the model's context.

Decoding itself belongs to the model's engine (generation/scheduler.py) and each step's
token choice to generation/sampling.py; this module holds what the task decides before the
first step: which text the model reads and how much of it fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from sidecar.domain import GenerateRequest
from sidecar.errors import InvalidInputError, ModelLoadError, WrongTaskError
from sidecar.generation.chat import ChatTemplate
from sidecar.generation.sequence import Prompt
from sidecar.models.manifest import GenerationDefaults, Manifest, Task
from sidecar.tasks.tokenization import TextEncoder


class GenerativeView(Protocol):
    """What the prompt reads from a loaded generative model."""

    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def encoder(self) -> TextEncoder: ...

    @property
    def chat(self) -> ChatTemplate | None: ...

    @property
    def context(self) -> int: ...

    @property
    def seq2seq(self) -> bool: ...

    @property
    def defaults(self) -> GenerationDefaults: ...


class GenerateTask:
    """Text generation, by decoder-only and encoder-decoder models."""

    rpc = "Generate"
    tasks = (Task.GENERATE, Task.SEQ2SEQ)

    def check_manifest(self, model_dir: Path, manifest: Manifest) -> None:
        """Raise ModelLoadError when a model dir cannot generate."""
        start = manifest.generation.decoder_start_token_id if manifest.generation else None
        if manifest.task is Task.SEQ2SEQ and start is None:
            raise ModelLoadError(f"{model_dir}: a seq2seq model needs decoder_start_token_id")

    def text(self, model: GenerativeView, request: GenerateRequest) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens."""
        if request.prompt and request.messages:
            raise InvalidInputError("set either prompt or messages, not both")
        if request.messages:
            if model.chat is None:
                raise WrongTaskError(
                    f"model {model.name!r} has no chat template, so it cannot take messages: "
                    "send a plain prompt, or serve a chat model"
                )
            # The template writes the special tokens itself, as apply_chat_template assumes.
            return model.chat.render(request.messages), False
        if not request.prompt:
            raise InvalidInputError("the request has no prompt: set prompt or messages")
        return request.prompt, True

    def prompt(
        self, model: GenerativeView, request: GenerateRequest, max_new_tokens: int
    ) -> Prompt:
        """Rendered and tokenized prompt, cut to fit the context when the request allows it.

        Decoder-only models keep the prompt's end (the latest turns), and room for the reply:
        at least max_new_tokens, at most half the context. Encoder-decoders keep the input's
        start, as the encoder tasks' truncation does.
        """
        context = model.context
        if not model.seq2seq and max_new_tokens >= context and not request.truncate:
            raise InvalidInputError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {context} tokens: lower it, or set truncate"
            )
        text, specials = self.text(model, request)
        ids = model.tokenizer.encode(text, add_special_tokens=specials).ids
        if not ids:
            raise InvalidInputError("the prompt encodes to no tokens; send some text")
        limit = context if model.seq2seq else context - max_new_tokens
        if len(ids) <= limit:
            return Prompt(ids)
        if not request.truncate:
            room = (
                f"the model's input limit of {context} tokens"
                if model.seq2seq
                else f"the {limit} tokens the model's context of {context} leaves beside "
                f"max_new_tokens {max_new_tokens}"
            )
            raise InvalidInputError(
                f"the prompt is {len(ids)} tokens, over {room}: shorten it, lower "
                "max_new_tokens, or set truncate to cut it"
            )
        if model.seq2seq:
            kept = model.encoder.encode_each([text], truncate=True)[0].ids.tolist()
            return Prompt(kept, len(ids) - len(kept))
        keep = max(limit, context // 2)
        if len(ids) <= keep:  # max_new_tokens is large, but the prompt fits in half
            return Prompt(ids)
        bos = model.defaults.bos_token_id
        head = ids[:1] if bos is not None and ids[0] == bos else []
        kept = head + ids[len(ids) - keep + len(head) :]
        return Prompt(kept, len(ids) - len(kept))


TASK = GenerateTask()

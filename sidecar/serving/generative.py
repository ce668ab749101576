"""A loaded generative model: prompts in (plain or chat), decode sequences out.

Blocking methods run on executor threads; the decode loop itself is the scheduler's.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.domain import GenerateRequest
from sidecar.errors import InvalidInputError, WrongTaskError
from sidecar.generation.chat import ChatTemplate
from sidecar.generation.sampling import SamplingParams
from sidecar.generation.sequence import Prompt, Sequence
from sidecar.model_files import read_json_object
from sidecar.models.manifest import GenerationDefaults, Manifest, Task
from sidecar.runtime.backend import Decoder
from sidecar.serving.served import WARM_UP_TEXT, LoadedModel
from sidecar.tasks.tokenization import TextEncoder


def special_tokens(model_dir: Path) -> dict[str, str]:
    """bos_token, eos_token and the like as strings, for chat templates that print them."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        for key, value in (read_json_object(model_dir / name) or {}).items():
            if key.endswith("_token") and isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                found.setdefault(key, value)
    return found


# The long warm-up prompt's length at most: attention costs grow with its square, and half of
# SmolLM2's 8k context took 35 s to prefill on 2 CPU cores, at every start.
WARM_UP_MAX_TOKENS = 512


class GenerativeModel(LoadedModel):
    """A decoder-only or encoder-decoder model ready for Generate; thread-safe."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        manifest: Manifest,
        encoder: TextEncoder,
        decoder: Decoder,
        chat: ChatTemplate | None,
    ) -> None:
        super().__init__(name, model_dir, manifest, encoder, decoder.name, decoder.device)
        self.decoder = decoder
        self.chat = chat
        self.defaults = manifest.generation or GenerationDefaults()
        self.tokenizer = encoder.untruncated  # tokenizer.json read and parsed once
        self.seq2seq = manifest.task is Task.SEQ2SEQ
        self.context = manifest.max_length

    def _text(self, request: GenerateRequest) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens."""
        if request.prompt and request.messages:
            raise InvalidInputError("set either prompt or messages, not both")
        if request.messages:
            if self.chat is None:
                raise WrongTaskError(
                    f"model {self.name!r} has no chat template, so it cannot take messages: "
                    "send a plain prompt, or serve a chat model"
                )
            # The template writes the special tokens itself, as apply_chat_template assumes.
            return self.chat.render(request.messages), False
        if not request.prompt:
            raise InvalidInputError("the request has no prompt: set prompt or messages")
        return request.prompt, True

    def prompt(self, request: GenerateRequest, max_new_tokens: int) -> Prompt:
        """Rendered and tokenized prompt, cut to fit the context when the request allows it.

        Decoder-only models keep the prompt's end (the latest turns), and room for the reply:
        at least max_new_tokens, at most half the context. Encoder-decoders keep the input's
        start, as the encoder tasks' truncation does.
        """
        if not self.seq2seq and max_new_tokens >= self.context and not request.truncate:
            raise InvalidInputError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {self.context} tokens: lower it, or set truncate"
            )
        text, specials = self._text(request)
        ids = self.tokenizer.encode(text, add_special_tokens=specials).ids
        if not ids:
            raise InvalidInputError("the prompt encodes to no tokens; send some text")
        limit = self.context if self.seq2seq else self.context - max_new_tokens
        if len(ids) <= limit:
            return Prompt(ids)
        if not request.truncate:
            room = (
                f"the model's input limit of {self.context} tokens"
                if self.seq2seq
                else f"the {limit} tokens the model's context of {self.context} leaves beside "
                f"max_new_tokens {max_new_tokens}"
            )
            raise InvalidInputError(
                f"the prompt is {len(ids)} tokens, over {room}: shorten it, lower "
                "max_new_tokens, or set truncate to cut it"
            )
        if self.seq2seq:
            kept = self.encoder.encode_each([text], truncate=True)[0].ids.tolist()
            return Prompt(kept, len(ids) - len(kept))
        keep = max(limit, self.context // 2)
        if len(ids) <= keep:  # max_new_tokens is large, but the prompt fits in half
            return Prompt(ids)
        bos = self.defaults.bos_token_id
        head = ids[:1] if bos is not None and ids[0] == bos else []
        kept = head + ids[len(ids) - keep + len(head) :]
        return Prompt(kept, len(ids) - len(kept))

    def sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """A new generation from this prompt."""
        # The loader refuses a seq2seq dir without a decoder start token.
        start = self.defaults.decoder_start_token_id if self.seq2seq else None
        return Sequence(prompt, params, self.tokenizer, self.context, start)

    def warm_up(self) -> None:
        """Prefill a short and a long prompt and take a few steps from each."""
        short = self.tokenizer.encode(WARM_UP_TEXT).ids
        long_ids = (short * self.context)[: min(self.context // 2, WARM_UP_MAX_TOKENS)]
        for ids in (short, long_ids):
            logits, cache = self.decoder.prefill(ids)
            for _ in range(2):
                token = int(logits.argmax())
                rows, (cache,) = self.decoder.step([cache], [token])
                logits = rows[0]

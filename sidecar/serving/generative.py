"""A loaded generative model: prompts in (plain or chat), decode sequences out.

Blocking methods run on executor threads; the decode loop itself is the scheduler's.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.domain import GenerateRequest
from sidecar.generation.chat import ChatTemplate
from sidecar.generation.formats import Constraint, Grammars
from sidecar.generation.sampling import SamplingParams
from sidecar.generation.scheduler import DecodeScheduler
from sidecar.generation.sequence import Prompt, Sequence
from sidecar.model_files import read_json_object
from sidecar.models.manifest import GenerationDefaults, Manifest, Task
from sidecar.models.preflight import read_config
from sidecar.runtime.backend import Decoder
from sidecar.serving.served import WARM_UP_TEXT, LoadedModel
from sidecar.tasks import generate
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
        self.engine: DecodeScheduler | None = None  # set by Engines when the model loads
        vocab_size = read_config(model_dir).get("vocab_size")
        self.grammars = Grammars(
            self.tokenizer,
            self.defaults.eos_token_ids,
            vocab_size if isinstance(vocab_size, int) else 0,
            self.defaults.bos_token_id,
        )

    def prompt(self, request: GenerateRequest, max_new_tokens: int) -> Prompt:
        """The request's prompt, rendered, tokenized and fitted to the context (on a thread)."""
        return generate.TASK.prompt(self, request, max_new_tokens)

    def constraint(self, request: GenerateRequest) -> Constraint | None:
        """The request's response format compiled for this model (on a thread); None if unset."""
        fmt = request.response_format
        return None if fmt is None else self.grammars.constraint(fmt)

    def sequence(
        self, prompt: Prompt, params: SamplingParams, constraint: Constraint | None = None
    ) -> Sequence:
        """A new generation from this prompt."""
        # The loader refuses a seq2seq dir without a decoder start token.
        start = self.defaults.decoder_start_token_id if self.seq2seq else None
        return Sequence(prompt, params, self.tokenizer, self.context, start, constraint)

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

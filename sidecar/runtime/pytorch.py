"""PyTorch fallback backend: a safetensors checkpoint through transformers, on CPU or CUDA.

Imported only when a model is configured with backend torch, so serving ONNX never imports
torch. Weights load from safetensors only (never pickle) and without remote code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from sidecar.errors import ConfigError, InvalidInputError, ModelLoadError
from sidecar.models.manifest import Task
from sidecar.runtime.backend import Arrays, Cache
from sidecar.runtime.devices import canonical_device, parse_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Part of the ValueError transformers raises when an architecture has no SDPA attention.
_NO_SDPA = "scaled_dot_product_attention"


def torch_device(device: str) -> torch.device:
    """The torch device for "cpu", "cuda" or "cuda:<i>"; refuses CUDA this process cannot use."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            "this torch build is CPU-only: install a CUDA build of torch"
            if torch.version.cuda is None
            else "torch sees no CUDA GPU: check the driver and CUDA_VISIBLE_DEVICES"
        )
        raise ConfigError(f"device {device!r} needs CUDA, but {why}; or set device: cpu")
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device {device!r} does not exist: torch sees {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def torch_dtype(device: str, dtype: str) -> torch.dtype:
    """The weights' dtype for a dtype setting (auto, float32, float16, bfloat16) on a device."""
    kind, index = parse_device(device)
    if dtype == "auto":
        return torch.float16 if kind == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if kind == "cpu" and dtype == "float16":
        raise ConfigError(
            "dtype float16 on CPU is refused: PyTorch's CPU float16 kernels are slow and "
            "incomplete; use float32, or bfloat16 on CPUs with native bf16 (AVX512-BF16, AMX)"
        )
    if kind == "cuda" and dtype == "bfloat16":
        torch_device(device)
        # Emulated bf16 (pre-Ampere GPUs) is far slower than float16; refuse it, not hide it.
        with torch.cuda.device(index):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        if not native:
            raise ConfigError(
                f"device {device!r} has no native bfloat16 support (it needs compute "
                "capability 8.0+): use dtype float16 or auto"
            )
    return DTYPES[dtype]


def load_model(auto_class: Any, model_dir: Path, device: str, dtype: str) -> Any:
    """from_pretrained in eval mode on the device: safetensors only, SDPA attention if it exists."""
    target, chosen = torch_device(device), torch_dtype(device, dtype)
    options: dict[str, Any] = {"dtype": chosen, "use_safetensors": True, "trust_remote_code": False}
    try:
        try:
            model = auto_class.from_pretrained(model_dir, attn_implementation="sdpa", **options)
        except ValueError as exc:
            if _NO_SDPA not in str(exc):
                raise
            model = auto_class.from_pretrained(model_dir, attn_implementation="eager", **options)
        return model.eval().to(target)
    except Exception as exc:  # transformers and safetensors raise many unrelated types
        raise ModelLoadError(
            f"PyTorch cannot load {model_dir} ({type(exc).__name__}: {exc}); the dir needs "
            "config.json and safetensors weights of an architecture transformers knows"
        ) from exc


def _numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    return np.asarray(tensor.detach().float().cpu().numpy(), dtype=np.float32)


def _accepts(model: Any, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


class _TorchModel:
    name = "torch"

    def __init__(self, auto_class: Any, model_dir: Path, device: str, dtype: str) -> None:
        self._model = load_model(auto_class, model_dir, device, dtype)
        self._device = torch_device(device)
        self.device = canonical_device(device)
        self.dtype = str(self._model.dtype).removeprefix("torch.")
        # "sdpa", or "eager" for architectures without it: worth a line in the load log.
        self.attention: str = self._model.config._attn_implementation

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        if not ids:
            raise InvalidInputError("the prompt has no tokens")
        return torch.tensor([list(ids)], dtype=torch.long, device=self._device)


class TorchBackend(_TorchModel):
    """An encoder run by PyTorch: embed gives last_hidden_state [batch, seq, hidden]; token
    classification logits [batch, seq, labels]; classify, rerank and zero-shot (sequence
    classifiers, the latter two fed text pairs) logits [batch, labels]."""

    # torch's thread pool is the process's: every pass runs on all of it.
    intra_op_threads = 0
    half_threads = 0

    def __init__(self, model_dir: Path, task: Task, device: str, dtype: str = "auto") -> None:
        auto_class: Any
        if task is Task.EMBED:
            auto_class, self._output = AutoModel, "last_hidden_state"
        elif task is Task.EXTRACT_ENTITIES:
            auto_class, self._output = AutoModelForTokenClassification, "logits"
        elif task in (Task.CLASSIFY, Task.RERANK, Task.ZERO_SHOT):
            auto_class, self._output = AutoModelForSequenceClassification, "logits"
        else:
            raise ModelLoadError(
                "TorchBackend runs encoder models (embed, classify, token classification, rerank, "
                f"zero-shot), not {task}"
            )
        super().__init__(auto_class, model_dir, device, dtype)
        self.input_names = tuple(n for n in ENCODER_INPUTS if _accepts(self._model, n))

    def run(self, inputs: Arrays, threads: int | None = None) -> dict[str, npt.NDArray[np.float32]]:
        """One forward pass on the inputs the model accepts; float32 outputs whatever the dtype.

        `threads` is ignored: torch's thread count is process-wide, not per call."""
        feed = {
            n: torch.from_numpy(np.asarray(inputs[n], dtype=np.int64)).to(self._device)
            for n in self.input_names
        }
        with torch.inference_mode():
            outputs = self._model(**feed)
        return {self._output: _numpy(outputs[self._output])}


@dataclass
class _State:
    """One sequence's decoder state. `past` is extended in place by the next forward pass."""

    past: Any  # DynamicCache / EncoderDecoderCache
    length: int  # tokens the decoder has seen
    encoded: Any = None  # seq2seq: the encoder's outputs, fed to every decoder pass
    encoder_mask: torch.Tensor | None = None


class _TorchDecoder(_TorchModel):
    """Steps sequences one at a time; each step extends and returns the cache passed in.

    Copying a KV cache per token would cost as much as the step, and the Decoder protocol
    promises that callers never reuse a cache they passed to step(), so none is copied.
    """

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[npt.NDArray[np.float32], Cache]:
        """Run the prompt; return the first new token's logits ([vocab]) and the cache."""
        logits, sequence = self._prefill(self._ids(prompt_ids))
        return _numpy(logits), sequence

    def step(
        self, caches: Sequence[Cache], tokens: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], list[Cache]]:
        """Feed each sequence its last token; return next-token logits ([n, vocab]) and caches."""
        if len(caches) != len(tokens):
            raise ValueError(f"step() got {len(caches)} caches but {len(tokens)} tokens")
        rows = [
            self._forward(c, torch.tensor([[t]], device=self._device))
            for c, t in zip(caches, tokens, strict=True)
        ]
        return _numpy(torch.stack([r for r, _ in rows])), [s for _, s in rows]

    def _prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        raise NotImplementedError

    def _forward(self, sequence: _State, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        raise NotImplementedError


class TorchCausalDecoder(_TorchDecoder):
    """A decoder-only language model (AutoModelForCausalLM) with a DynamicCache per sequence."""

    def __init__(self, model_dir: Path, device: str, dtype: str = "auto") -> None:
        super().__init__(AutoModelForCausalLM, model_dir, device, dtype)
        self._positions = _accepts(self._model, "position_ids")
        self._cache_position = _accepts(self._model, "cache_position")

    def _prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        return self._forward(_State(past=None, length=0), ids)

    def _forward(self, sequence: _State, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        start, end = sequence.length, sequence.length + ids.shape[1]
        positions = torch.arange(start, end, device=self._device)
        extra: dict[str, torch.Tensor] = {}
        # Unpadded sequences: positions continue from the cache, as generate() computes them.
        if self._positions:
            extra["position_ids"] = positions.unsqueeze(0)
        if self._cache_position:
            extra["cache_position"] = positions
        with torch.inference_mode():
            out = self._model(
                input_ids=ids,
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self._device),
                past_key_values=sequence.past,
                use_cache=True,
                **extra,
            )
        return out.logits[0, -1], _State(past=out.past_key_values, length=end)


class TorchSeq2SeqDecoder(_TorchDecoder):
    """An encoder-decoder model (AutoModelForSeq2SeqLM); the encoder runs once, in prefill."""

    def __init__(
        self, model_dir: Path, device: str, decoder_start_token_id: int, dtype: str = "auto"
    ) -> None:
        super().__init__(AutoModelForSeq2SeqLM, model_dir, device, dtype)
        self.decoder_start_token_id = decoder_start_token_id
        self._cache_position = _accepts(self._model, "cache_position")

    def _prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            encoded = self._model.get_encoder()(
                input_ids=ids, attention_mask=mask, return_dict=True
            )
        start = torch.tensor([[self.decoder_start_token_id]], device=self._device)
        return self._forward(_State(None, 0, encoded, mask), start)

    def _forward(self, sequence: _State, ids: torch.Tensor) -> tuple[torch.Tensor, _State]:
        extra: dict[str, torch.Tensor] = {}
        if self._cache_position:
            extra["cache_position"] = torch.tensor([sequence.length], device=self._device)
        with torch.inference_mode():
            out = self._model(
                encoder_outputs=sequence.encoded,
                attention_mask=sequence.encoder_mask,
                decoder_input_ids=ids,
                past_key_values=sequence.past,
                use_cache=True,
                **extra,
            )
        new = _State(
            out.past_key_values, sequence.length + 1, sequence.encoded, sequence.encoder_mask
        )
        return out.logits[0, -1], new

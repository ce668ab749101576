"""A loaded model: tokenizer, backend and the task's pre/post-processing, timed per stage.

Every method is blocking and runs on an executor thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.batching.batcher import Batcher, BatchOutput, JobOutput
from sidecar.domain import CallInfo, TokenizeResult
from sidecar.models.manifest import Manifest, Task
from sidecar.runtime.backend import Backend
from sidecar.tasks import registry
from sidecar.tasks.base import InputLimits, Prepared, Rows
from sidecar.tasks.tokenization import EncodedText, TextEncoder

WARM_UP_TEXT = "Warm-up: the sidecar runs one short and one full-length input before serving."


def _us(start_ns: int, end_ns: int) -> int:
    return (end_ns - start_ns) // 1000


class LoadedModel:
    """What every loaded model offers, whatever its task: identity, tokenizer, Tokenize."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        manifest: Manifest,
        encoder: TextEncoder,
        backend_name: str,
        device: str,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.manifest = manifest
        self.encoder = encoder
        self.backend_name = backend_name
        self.device = device

    @property
    def task(self) -> Task:
        """The task from the manifest."""
        return self.manifest.task

    def call_info(self) -> CallInfo:
        """A CallInfo naming this model, with zero timings."""
        return CallInfo(
            model=self.name,
            revision=self.manifest.digest,
            backend=self.backend_name,
            device=self.device,
        )

    def tokenize(
        self, texts: Sequence[str], *, add_special_tokens: bool, truncate: bool
    ) -> TokenizeResult:
        """The model's tokens for each text."""
        info = self.call_info()
        t0 = time.perf_counter_ns()
        tokens = self.encoder.tokenize(
            texts, add_special_tokens=add_special_tokens, truncate=truncate
        )
        info.tokenize_us = _us(t0, time.perf_counter_ns())
        info.batch_size = len(texts)
        return TokenizeResult(results=tokens, max_length=self.encoder.max_length, info=info)

    def warm_up(self) -> None:
        """Run the model once or twice so the first real call pays no allocation cost."""
        raise NotImplementedError


class ServedModel(LoadedModel):
    """An encoder model ready for calls; thread-safe. Its task module does the task's part."""

    def __init__(
        self, name: str, model_dir: Path, manifest: Manifest, encoder: TextEncoder, backend: Backend
    ) -> None:
        super().__init__(name, model_dir, manifest, encoder, backend.name, backend.device)
        self.backend = backend
        self.handler = registry.encoder_task(manifest.task)
        self.engine: Batcher[EncodedText] | None = None  # set by Engines when the model loads

    def encode(self, texts: Sequence[str], *, truncate: bool) -> list[EncodedText]:
        """The model's ids for each text, unpadded; over-long ones cut when `truncate`."""
        return self.encoder.encode_each(texts, truncate=truncate)

    def infer(self, items: Sequence[EncodedText], threads: int | None = None) -> BatchOutput:
        """One forward pass over a batch, reduced by the task to one row per input; `threads`
        picks the backend's lane (None: its own setting)."""
        batch = self.encoder.pad(items)
        t0 = time.perf_counter_ns()
        outputs = self.backend.run(batch.feed(), threads)
        t1 = time.perf_counter_ns()
        rows = self.handler.reduce(self, outputs, batch, items)
        return BatchOutput(
            rows=rows,
            inference_us=_us(t0, t1),
            postprocess_us=_us(t1, time.perf_counter_ns()),
        )

    def answer(self, job: JobOutput[EncodedText], request: Any, prepared: Prepared) -> Any:
        """The task's answer to one batched call, with the call's timings."""
        info = self.call_info()
        info.queue_us, info.tokenize_us = job.queue_us, job.tokenize_us
        info.inference_us, info.postprocess_us = job.inference_us, job.postprocess_us
        info.batch_size = job.batch_size
        return self._finish(job.rows, job.inputs, request, prepared, info)

    def _finish(
        self,
        rows: Rows,
        items: Sequence[EncodedText],
        request: Any,
        prepared: Prepared,
        info: CallInfo,
    ) -> Any:
        """The task's answer from the call's rows, its time counted as postprocessing."""
        t0 = time.perf_counter_ns()
        result = self.handler.finish(self, rows, items, request, prepared, info)
        info.postprocess_us += _us(t0, time.perf_counter_ns())
        return result

    def direct(self, request: Any, limits: InputLimits | None = None) -> Any:
        """Answer a request as one batch, outside any queue (the bench and tests use this)."""
        limits = limits or InputLimits(1 << 30, 1 << 30, 1 << 30)
        self.handler.check(request, limits)
        prepared = self.handler.prepare(self, request, limits)
        info = self.call_info()
        t0 = time.perf_counter_ns()
        items = prepared.encode()
        info.tokenize_us = _us(t0, time.perf_counter_ns())
        output = self.infer(items)
        info.inference_us, info.postprocess_us = output.inference_us, output.postprocess_us
        info.batch_size = len(items)
        return self._finish(output.rows, items, request, prepared, info)

    def warm_up(self) -> None:
        """Run a short and a full-length batch so the first real call pays no allocation cost."""
        long_text = " ".join([WARM_UP_TEXT] * self.encoder.max_length)
        items = self.encode([WARM_UP_TEXT, long_text], truncate=True)
        self.infer(items)
        if self.backend.half_threads:
            self.infer(items, threads=self.backend.half_threads)

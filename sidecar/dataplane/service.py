"""The dataplane: validate, route to a model's batcher, bound the work, honour deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from sidecar.batching.batcher import Batcher, BatchLimits, JobOutput
from sidecar.config import Settings
from sidecar.dataplane.admission import Admission, InFlightLimit
from sidecar.dataplane.generation import Generation, Generations
from sidecar.dataplane.registry import ModelRegistry
from sidecar.dataplane.validation import check_candidates, check_inputs, check_non_negative
from sidecar.domain import (
    CallInfo,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    ExtractEntitiesRequest,
    ExtractEntitiesResult,
    GenerateRequest,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResult,
)
from sidecar.errors import DeadlineExceededError, InvalidInputError
from sidecar.models.manifest import Task
from sidecar.serving.generative import GenerativeModel
from sidecar.serving.served import ServedModel
from sidecar.tasks import entities, pairs
from sidecar.tasks.tokenization import EncodedText
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.observer import Telemetry


class DataPlane:
    """Everything a servicer needs, in domain types. Deadlines are time.monotonic() values.

    Embed and Classify inputs go through their model's batcher; `model_pool` runs forward
    passes and `prepare_pool` tokenizes (so the next batch is tokenized while one runs).
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        model_pool: Executor,
        prepare_pool: Executor,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry(Metrics(), None, settings.log_inputs)
        self.registry = registry
        self.admission = Admission()
        self._model_pool = model_pool
        self._prepare_pool = prepare_pool
        self._limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            workers=settings.inference_workers,
        )
        self._batchers: dict[str, Batcher[EncodedText]] = {}
        # One count of free inference threads for every model's batcher: they share the pool.
        self._slots = asyncio.Semaphore(settings.inference_workers)
        # Unary calls and Stream items in progress.
        self._requests = InFlightLimit(
            settings.max_concurrent_requests, "requests", "max_concurrent_requests"
        )
        self.generations = Generations(
            settings, model_pool, prepare_pool, self._slots, self.telemetry
        )
        self.telemetry.metrics.generations(lambda: self.generations.running)

    def batcher(self, model: ServedModel) -> Batcher[EncodedText]:
        """The model's batcher, made on first use."""
        batcher = self._batchers.get(model.name)
        if batcher is None:
            batcher = Batcher(
                model.name,
                model.infer,
                self._limits,
                self._model_pool,
                self._prepare_pool,
                self._slots,
                self.telemetry,
            )
            self._batchers[model.name] = batcher
            self.telemetry.metrics.queue_depth(model.name, lambda: batcher.depth)
        return batcher

    async def _batched(
        self,
        model: ServedModel,
        count: int,
        prepare: Callable[[], Sequence[EncodedText]],
        deadline: float | None,
    ) -> tuple[JobOutput[EncodedText], CallInfo]:
        """Queue a call's `count` inputs (encoded by `prepare`) on the model's batcher."""
        with self._requests.held():
            job = await self.batcher(model).submit(count, prepare, deadline)
        info = model.call_info()
        info.queue_us, info.tokenize_us = job.queue_us, job.tokenize_us
        info.inference_us, info.postprocess_us = job.inference_us, job.postprocess_us
        info.batch_size = job.batch_size
        return job, info

    def _observed(self, job: JobOutput[EncodedText], info: CallInfo, inputs: Sequence[str]) -> None:
        """Report an answered batched call: its model, queue time and spans."""
        self.telemetry.describe(info, inputs)
        truncated = any(item.truncated for item in job.inputs)
        self.telemetry.call(job.stamps, info, truncated, time.time_ns())

    async def embed(self, request: EmbedRequest, deadline: float | None = None) -> EmbedResult:
        """Embeddings for a batch of texts."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        model = self.registry.resolve(request.model, Task.EMBED, "Embed")
        assert isinstance(model, ServedModel)  # the registry checked the task
        job, info = await self._batched(
            model,
            len(request.inputs),
            lambda: model.encode(request.inputs, request.truncate),
            deadline,
        )
        result = model.embed_result(job.rows, job.inputs, request.normalize, info)
        self._observed(job, info, request.inputs)
        return result

    async def classify(
        self, request: ClassifyRequest, deadline: float | None = None
    ) -> ClassifyResult:
        """Label probabilities for a batch of texts."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        check_non_negative("top_k", request.top_k)
        model = self.registry.resolve(request.model, (Task.CLASSIFY, Task.ZERO_SHOT), "Classify")
        assert isinstance(model, ServedModel)
        if model.task is Task.ZERO_SHOT:
            return await self._zero_shot(model, request, deadline)
        if request.candidate_labels or request.hypothesis_template or request.multi_label:
            raise InvalidInputError(
                f"model {model.name!r} has fixed labels; candidate_labels, "
                "hypothesis_template and multi_label need a zero-shot (NLI) model"
            )
        job, info = await self._batched(
            model,
            len(request.inputs),
            lambda: model.encode(request.inputs, request.truncate),
            deadline,
        )
        classified = model.classify_result(job.rows, job.inputs, request.top_k, info)
        self._observed(job, info, request.inputs)
        return classified

    async def _zero_shot(
        self, model: ServedModel, request: ClassifyRequest, deadline: float | None
    ) -> ClassifyResult:
        """Every input against every candidate's hypothesis, as one batch of pairs."""
        candidates = check_candidates(request.candidate_labels, model.name)
        hypotheses = pairs.hypotheses(request.hypothesis_template, candidates)
        count = len(request.inputs) * len(candidates)
        if count > self.settings.max_queue_size:
            raise InvalidInputError(
                f"{len(request.inputs)} inputs x {len(candidates)} candidate labels make "
                f"{count} pairs, over max_queue_size {self.settings.max_queue_size}: send "
                "fewer inputs per call"
            )
        premise_pairs = [(text, h) for text in request.inputs for h in hypotheses]
        job, info = await self._batched(
            model,
            count,
            lambda: model.encoder.encode_pairs(premise_pairs, request.truncate, keep="second"),
            deadline,
        )
        result = model.zero_shot_result(
            job.rows, job.inputs, candidates, request.multi_label, request.top_k, info
        )
        self._observed(job, info, request.inputs)
        return result

    async def extract_entities(
        self, request: ExtractEntitiesRequest, deadline: float | None = None
    ) -> ExtractEntitiesResult:
        """Entities in each of a batch of texts."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        if request.aggregation not in entities.STRATEGIES:
            raise InvalidInputError(
                f"aggregation {request.aggregation!r} is not one of "
                f"{', '.join(entities.STRATEGIES)}"
            )
        model = self.registry.resolve(request.model, Task.EXTRACT_ENTITIES, "ExtractEntities")
        assert isinstance(model, ServedModel)
        job, info = await self._batched(
            model,
            len(request.inputs),
            lambda: model.encoder.encode_each(request.inputs, request.truncate, with_offsets=True),
            deadline,
        )
        found = model.entities_result(
            job.rows, job.inputs, request.inputs, request.aggregation, info
        )
        self._observed(job, info, request.inputs)
        return found

    async def rerank(self, request: RerankRequest, deadline: float | None = None) -> RerankResult:
        """Passages scored against the query, most relevant first."""
        if not request.query.strip():
            raise InvalidInputError("query is empty or whitespace-only: send the search query")
        check_inputs(
            request.inputs, self.settings.max_rerank_passages, limit_name="max_rerank_passages"
        )
        check_non_negative("top_n", request.top_n)
        model = self.registry.resolve(request.model, Task.RERANK, "Rerank")
        assert isinstance(model, ServedModel)
        query_pairs = [(request.query, passage) for passage in request.inputs]
        job, info = await self._batched(
            model,
            len(query_pairs),
            lambda: model.encoder.encode_pairs(query_pairs, request.truncate, keep="first"),
            deadline,
        )
        ranked = model.rerank_result(
            job.rows, job.inputs, request.inputs, request.top_n, request.return_text, info
        )
        self._observed(job, info, [request.query, *request.inputs])
        return ranked

    async def tokenize(
        self, request: TokenizeRequest, deadline: float | None = None
    ) -> TokenizeResult:
        """The model's tokens for a batch of texts (any task); no forward pass, no queue."""
        check_inputs(request.inputs, self.settings.max_client_batch_size)
        model = self.registry.resolve(request.model)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("the call's deadline passed before it started")
        with self._requests.held():
            work = asyncio.get_running_loop().run_in_executor(
                self._prepare_pool,
                lambda: model.tokenize(
                    request.inputs, request.add_special_tokens, request.truncate
                ),
            )
            try:
                async with asyncio.timeout_at(deadline):
                    return await work
            except TimeoutError:
                raise DeadlineExceededError(
                    "the call's deadline passed while tokenizing; allow a longer deadline"
                ) from None

    def generate(self, request: GenerateRequest, deadline: float | None = None) -> Generation:
        """A generation to iterate; bad parameters and a wrong model are refused here."""
        model = self.registry.resolve(request.model, (Task.GENERATE, Task.SEQ2SEQ), "Generate")
        assert isinstance(model, GenerativeModel)
        return self.generations.start(model, request, deadline)

    async def close(self) -> None:
        """Stop every batcher and decode scheduler; calls still queued are refused."""
        await asyncio.gather(
            *(b.close() for b in self._batchers.values()), self.generations.close()
        )

"""Domain results -> JSON bodies, in the shapes OpenAI (and Cohere, for rerank) document."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np

from sidecar.domain import (
    CallInfo,
    EmbedResult,
    FinishReason,
    ModelStatus,
    RerankResult,
    Usage,
)

OWNER = "transformers-sidecar"
# OpenAI has two reasons: the reply ended by itself, or it ran into the token limit.
FINISH_REASONS = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.COMPLETE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",  # never sent: the caller has left
}


def info_headers(info: CallInfo) -> dict[str, str]:
    """ResponseMetadata as response headers: which model answered, where its time went."""
    return {
        "x-sidecar-model": info.model,
        "x-sidecar-revision": info.revision,
        "x-sidecar-backend": info.backend,
        "x-sidecar-device": info.device,
        "x-sidecar-queue-us": str(info.queue_us),
        "x-sidecar-tokenize-us": str(info.tokenize_us),
        "x-sidecar-inference-us": str(info.inference_us),
        "x-sidecar-batch-size": str(info.batch_size),
    }


def embeddings(result: EmbedResult, encoding: str) -> dict[str, Any]:
    """The /v1/embeddings body: float lists, or base64 of little-endian float32 as the
    openai SDKs decode it."""
    data = []
    for index, embedding in enumerate(result.embeddings):
        values = embedding.values
        vector: Any = (
            base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode()
            if encoding == "base64"
            else values.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(e.token_count for e in result.embeddings)
    return {
        "object": "list",
        "data": data,
        "model": result.info.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def rerank(result: RerankResult, *, documents: bool) -> dict[str, Any]:
    """The /v1/rerank body, most relevant first, in Cohere's shape (which TEI's and
    Infinity's clients read too)."""
    results = []
    for passage in result.results:
        entry: dict[str, Any] = {"index": passage.index, "relevance_score": passage.score}
        if documents:
            entry["document"] = {"text": passage.text}
        results.append(entry)
    return {
        "id": uuid.uuid4().hex,
        "object": "rerank",
        "model": result.info.model,
        "results": results,
    }


def model(status: ModelStatus, created: int) -> dict[str, Any]:
    """One /v1/models entry: OpenAI's fields, then what this server knows of the model."""
    manifest = status.manifest
    return {
        "id": status.name,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "task": str(status.task) if status.task else None,
        "state": status.state.value,
        "backend": status.backend,
        "device": status.device,
        "revision": manifest.digest if manifest else None,
        "max_model_len": manifest.max_length if manifest else None,
        "error": status.error or None,
    }


def usage(value: Usage | None) -> dict[str, int] | None:
    """OpenAI's usage object."""
    if value is None:
        return None
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.prompt_tokens + value.completion_tokens,
    }


class Completion:
    """The bodies of one (chat) completion: whole, or chunk by chunk for a stream."""

    def __init__(self, model: str, revision: str, *, chat: bool) -> None:
        self.chat = chat
        prefix, self.object = (
            ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        )
        self._head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": self.object,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": revision,
        }

    def whole(self, text: str, finish: FinishReason | None, used: Usage | None) -> dict[str, Any]:
        """A finished reply in one body."""
        reason = FINISH_REASONS[finish] if finish else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {**self._head, "choices": [choice], "usage": usage(used)}

    def chunk(
        self,
        text: str,
        finish: FinishReason | None = None,
        *,
        first: bool = False,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        """One streamed step; the first chat chunk names the role."""
        reason = FINISH_REASONS[finish] if finish else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
        else:
            choice["text"] = text
        body = {**self._head, "object": f"{self.object}.chunk" if self.chat else self.object}
        body["choices"] = [choice]
        if with_usage:
            body["usage"] = None  # OpenAI's form: null on every chunk but the usage one
        return body

    def usage_chunk(self, used: Usage | None) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, only the usage."""
        head = {**self._head, "object": f"{self.object}.chunk" if self.chat else self.object}
        return {**head, "choices": [], "usage": usage(used)}

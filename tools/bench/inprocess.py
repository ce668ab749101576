"""The ceiling: the same model file in ONNX Runtime in this process, no server in between.

Text in, pooled vector out, through the sidecar's own tokenizer, session and pooling, with
the same thread budget the server gets. The ceiling sorts the corpus by length (the least
padding possible) and runs it at each batch size; the best one is the ceiling.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.domain import EmbedRequest
from sidecar.models.manifest import read_manifest
from sidecar.serving.loader import load_model
from sidecar.serving.served import ServedModel


def load(model_dir: Path, device: str, threads: int) -> ServedModel:
    """Load a model dir the way the server does (checksums, preflight, warm-up)."""
    model = load_model(model_dir.name, model_dir, read_manifest(model_dir), device, threads)
    if not isinstance(model, ServedModel):
        raise SystemExit(f"{model_dir} is not an encoder model: the ceiling embeds")
    return model


def _embed(model: ServedModel, texts: list[str]) -> npt.NDArray[np.float32]:
    return model.infer(model.encode(texts, truncate=True)).rows


def ceiling(
    model: ServedModel, texts: list[str], sizes: list[int], seconds: float
) -> dict[int, float]:
    """Texts per second at each batch size over the length-sorted corpus."""
    ordered = sorted(texts, key=lambda t: len(model.encode([t], truncate=True)[0].ids))
    result: dict[int, float] = {}
    for size in sizes:
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        done, began = 0, time.perf_counter()
        # Whole passes over the corpus, so every batch size sees the same length mix.
        while True:
            for batch in batches:
                _embed(model, batch)
            done += len(ordered)
            if time.perf_counter() - began >= seconds:
                break
        result[size] = done / (time.perf_counter() - began)
    return result


def single(model: ServedModel, texts: list[str], warmup: float, seconds: float) -> list[float]:
    """Latencies of tokenize+run+pool for one text at a time, in corpus order.

    Timed like one caller of the load generator (same order, same warm-up and window), so
    the two medians are over the same texts.
    """
    latencies: list[float] = []
    began = time.perf_counter()
    for index in itertools.count():
        start = time.perf_counter()
        if start - began >= warmup + seconds:
            break
        _embed(model, [texts[index % len(texts)]])
        if start - began >= warmup:
            latencies.append(time.perf_counter() - start)
    return latencies


def cosine(a: ServedModel, b: ServedModel, texts: list[str]) -> tuple[float, float]:
    """Min and mean cosine between two models' normalized embeddings of the texts."""
    values: list[float] = []
    for start in range(0, len(texts), 32):
        batch = texts[start : start + 32]
        request = EmbedRequest(model="", inputs=batch, normalize=True, truncate=True)
        x, y = (m.direct(request) for m in (a, b))
        values += [
            float(np.dot(p.values, q.values))
            for p, q in zip(x.embeddings, y.embeddings, strict=True)
        ]
    return min(values), statistics.fmean(values)

"""The baseline the seed articles warn about: transformers.pipeline behind FastAPI.

    BENCH_NAIVE_MODEL=path/to/checkpoint [BENCH_NAIVE_DEVICE=cuda] \\
        uvicorn naive:app --app-dir tools/bench

The bench runs it as the `naive` peer from a venv of its own (tools/bench/peers/naive.txt),
importing nothing from the project; `--quick` runs it from the project's venv instead.
Loaded once at start-up (the articles' first fix), then one pipeline call per request on
uvicorn's thread pool, PyTorch eager on the bench's device, no batching across requests; mean
pooling and normalization in numpy, as a sentence-transformers user would write it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

_extractor: Any = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Load the pipeline once per process, before the first request."""
    global _extractor
    _extractor = pipeline(
        "feature-extraction",
        model=os.environ["BENCH_NAIVE_MODEL"],
        framework="pt",
        device=os.environ.get("BENCH_NAIVE_DEVICE", "cpu"),
    )
    yield


app = FastAPI(lifespan=lifespan)


class EmbedBody(BaseModel):
    """The JSON body: texts to embed."""

    inputs: list[str]


@app.post("/embed")
def embed(body: EmbedBody) -> dict[str, list[list[float]]]:
    """Mean-pooled, normalized embeddings, one pipeline call per request."""
    vectors = []
    for hidden in _extractor(body.inputs, truncation=True):
        pooled = np.asarray(hidden[0]).mean(axis=0)
        vectors.append((pooled / np.linalg.norm(pooled)).tolist())
    return {"embeddings": vectors}

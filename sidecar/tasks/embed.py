"""Pooling token vectors into one embedding, as sentence-transformers' Pooling module does."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")

FloatArray = npt.NDArray[np.float32]


def pool(hidden: FloatArray, mask: npt.NDArray[np.int64], mode: str) -> FloatArray:
    """Reduce [batch, seq, dim] token vectors to [batch, dim], ignoring padding."""
    weights = mask[..., None].astype(hidden.dtype)
    # Select rather than multiply: a NaN at a padded position times 0 is still NaN.
    masked = np.where(weights > 0, hidden, 0).astype(hidden.dtype)
    pooled: FloatArray
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "lasttoken":
        pooled = hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    elif mode == "max":
        # Padding must never win the max.
        pooled = np.where(weights > 0, hidden, np.finfo(hidden.dtype).min).max(axis=1)
    elif mode in ("mean", "mean_sqrt_len"):
        counts = np.clip(weights.sum(axis=1), 1e-9, None)
        summed = masked.sum(axis=1)
        pooled = summed / (counts if mode == "mean" else np.sqrt(counts))
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(POOLING_MODES)}")
    return pooled


def normalize(vectors: FloatArray) -> FloatArray:
    """Scale rows to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: FloatArray = vectors / np.clip(norms, 1e-12, None)
    return scaled

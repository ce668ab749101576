"""Turning classifier logits into sorted label probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sidecar.domain import LabelScore


def probabilities(logits: npt.NDArray[np.float32], multi_label: bool) -> npt.NDArray[np.float32]:
    """Sigmoid per label for multi-label models, else a numerically stable softmax."""
    logits = logits.astype(np.float32, copy=False)
    probs: npt.NDArray[np.float32]
    if multi_label:
        probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    else:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


def ranked(scores: npt.NDArray[np.float32], labels: Sequence[str], top_k: int) -> list[LabelScore]:
    """Labels sorted by score, best first; top_k 0 keeps them all."""
    order = np.argsort(-scores, kind="stable")
    if top_k:
        order = order[:top_k]
    return [LabelScore(label=labels[i], score=float(scores[i]), id=int(i)) for i in order]

"""Scores over (text, text) pairs: cross-encoder reranking and NLI zero-shot classification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sidecar.errors import InvalidInputError

DEFAULT_TEMPLATE = "This example is {}."


def sigmoid(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Relevance in [0, 1] from a cross-encoder's single logit."""
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return result


def entailment_id(labels: Sequence[str]) -> int:
    """The NLI label meaning entailment (-1 when there is none), found as transformers does."""
    return next((i for i, label in enumerate(labels) if label.lower().startswith("entail")), -1)


def hypotheses(template: str, candidates: Sequence[str]) -> list[str]:
    """The hypothesis for each candidate label."""
    template = template or DEFAULT_TEMPLATE
    try:
        built = [template.format(label) for label in candidates]
    except (IndexError, KeyError, ValueError) as exc:
        raise InvalidInputError(
            f"hypothesis_template {template!r} is not a template with one {{}} for the label "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if built and built[0] == template:
        raise InvalidInputError(
            f"hypothesis_template {template!r} has no {{}} where the label goes"
        )
    return built


def zero_shot(
    logits: npt.NDArray[np.float32], entail: int, multi_label: bool
) -> npt.NDArray[np.float32]:
    """Each candidate's probability from its NLI logits ([candidates, nli labels]).

    One distribution over the candidates' entailment logits, or with `multi_label` (or a
    single candidate) entailment against contradiction for each candidate on its own.
    """
    if multi_label or len(logits) == 1:
        contradiction = -1 if entail == 0 else 0
        pair = logits[:, [contradiction, entail]]
        weights = np.exp(pair - pair.max(axis=1, keepdims=True))
        result: npt.NDArray[np.float32] = (weights / weights.sum(axis=1, keepdims=True))[:, 1]
        return result
    scores = logits[:, entail]
    weights = np.exp(scores - scores.max())
    normalized: npt.NDArray[np.float32] = weights / weights.sum()
    return normalized
